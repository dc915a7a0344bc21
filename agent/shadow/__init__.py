"""Shadow runs of a candidate model beside the active one, and output statistics.

- :mod:`agent.shadow.agreement`: pure rules: agreement per task, the frame sampler,
  the CPU bound, the promotion decision.
- :mod:`agent.shadow.outputs`: output statistics per model version (score histogram,
  class mix), the previous version's kept.
- :mod:`agent.shadow.instruction`: the fleet's shadow document, parsed and verified.
- :mod:`agent.shadow.run`: ``ShadowRun``, the pipeline observer that runs the candidate.
- :mod:`agent.shadow.control`: ``Shadows``, one model's shadow run: fetch, load,
  attach, report, promote, stop.
- :mod:`agent.shadow.unit`: ``ShadowUnit``, all of it for one served model (what the
  service holds: topics, observers, the state's and telemetry's parts).
"""
