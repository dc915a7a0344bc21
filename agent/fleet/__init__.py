"""Fleet-side tools: publishing releases (and, later, deploy, rollout, devices)."""
