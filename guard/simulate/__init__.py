"""``mx-guard simulate``: decision accuracy on a virtual clock (SPEC section 10).

A discrete-event simulation of one guarded domain over a day of mail. The guard's own
code decides: the prober's hysteresis and schedule over a modelled primary, the
aggregation over nodes, the refresher, ``decide()``; only the world is modelled.

- ``clock``: the event loop and virtual clock;
- ``primary``: the primary MX (outages, flaps, tarpit, 4xx greetings, greylisting,
  per-family failures, partitions);
- ``senders``: legitimate MTAs and spam bots with their real MX walking and retries;
- ``secondary``: a guard node driven on the virtual clock;
- ``world``: the topology and the run; ``scenario``: the TOML format;
- ``report``: the table and the JSON; ``cli``: the command.
"""
