"""Updates on a running device: which release to run, getting it there, keeping it only
if it works.

What to run comes from the desired state pushed over MQTT (``agent.desired``), else
from the registry channel, polled with ETag/If-None-Match every
``registry.poll_interval_s`` (jittered). One worker thread takes one update at a time
through its phases:

    downloading -> verifying -> validating -> activating -> probation

and every update ends in a terminal outcome: ``succeeded``, ``failed`` or
``rolled_back``, each with a reason. Phases and outcomes are published in the
retained ``state`` and as events, and recorded in a journal (``updates.json`` in the
store) that is rewritten atomically at every step. After a crash or power cut the
journal tells the next start where the update stood: an interrupted download or
validation ends as ``failed`` (and is retried), an interrupted probation goes on, and
a release under which the agent keeps restarting (``update.crash_loop_restarts``
unclean starts during probation) is rolled back before it is loaded again. A damaged
journal is set aside (``updates.json.damaged-<ts>``) and reported (``state_repaired``);
the agent goes on with a fresh one.

A release that fails its self-test, its latency budget or its probation is marked bad
on this device: the channel never offers it again, and a desired state issued before
the marking is ignored. A desired state issued after it is the operator's deliberate
retry, and is tried.

The package, as python-tuf splits rules from I/O:

- ``journal``: the typed journal document, checked field by field on load; its file.
- ``policy``: the rules (what to apply, retry schedule, failure classes, recovery), pure.
- ``probation``: judging the stream's figures over the window, pure.
- ``steps``: the I/O of each step (stage, validate, activate, roll back) behind the
  ``Steps`` protocol; ``DeviceSteps`` is the real one.
- ``worker``: ``Updates``, the one thread that owns the state and runs the loop.

(``agent.pull`` is one pull: fetch, verify, stage into the store.) The package itself
imports nothing: ``edge-agent models pull`` needs only the journal
(``journal.note_offline_pull``), not the worker and its MQTT.
"""
