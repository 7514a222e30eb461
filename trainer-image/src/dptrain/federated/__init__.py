"""Federated DP-SGD across sites on Flower (the ``federated`` extra).

A coordinator runs Flower's SuperLink and the ServerApp (:mod:`.server_app`: Flower's FedAvg, weighted by public
declared sizes); every site runs a SuperNode next to its data, whose ClientApp (:mod:`.client_app`) runs dptrain's
DP-SGD engine for its local steps (:mod:`.site`: same clipping, write-ahead journal, checkpoint). Each site's
guarantee is sample-level DP for its own records, over all rounds, charged in its own journal and ledger.
:mod:`.supervisor` runs the two roles as pod processes, :mod:`.local` a whole federation on one machine.
"""
