"""`splitlm audit`: the honest-but-curious server's attacks on what a device sends (server side: torch).

    frames.py   the device's frames: its own side run over a data file (edge_client's reader, runtime and
                privatizer, reused), or a recorded frame log
    attacks.py  dictionary lookup, learned inverter, exact search, tail_grad label recovery
    run.py      AuditConfig -> run_audit -> AuditResult (per attack: share of tokens recovered)
"""

# Here, not in run.py, so the CLI's parser can list them without importing torch.
ACTIVATION_ATTACKS = ("dictionary", "dictionary-cosine", "inverter", "exact")
ATTACKS = (*ACTIVATION_ATTACKS, "labels")
CHEAP = ("dictionary", "dictionary-cosine", "inverter", "labels")  # the default: each in seconds to a minute
