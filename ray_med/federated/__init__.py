"""Federated hospitals (FedKIM, client side): clients train modality encoders and task heads where the data is.

Pure modules (no Ray): :mod:`partition` (the 7:1:1:1 split, IID / Dirichlet / quantity
partitions), :mod:`strategies` (per-modality weighted FedAvg, FedProx's term, FedAdam),
:mod:`privacy` (DP-FedAvg clip and noise, Opacus's accountant), :mod:`secagg` (pairwise
masks from X25519), :mod:`models` (encoders and heads, safetensors folders), :mod:`data`
(a modality's rows as arrays) and :mod:`client` (one round at one client, through the
shared training loop). Ray shells: :mod:`executor` (the pool actor that runs any virtual
client) and :mod:`server` (rounds, deadlines, drops, checkpoints). :mod:`job` is
``jobs/federated.py``; :mod:`evaluate` is ``evaluate.py federated``.
"""
