"""A multi-node Ray on one machine (``ray.cluster_utils.Cluster``) for the node-loss tests.

The head (2 CPUs) runs the drivers' helpers: Ray Data, Train's controller, the federated
server's pool (``federated_pool``: never a hospital's node), Serve's controller and proxy.
Each test adds the worker nodes it needs, with the custom resources that place its work
(``trainer``, ``hospital_*``, ``serve``), removes one under load, and ``cluster_nodes``
removes its nodes when it ends. These tests run first in the session
(tests/conftest.py sorts them), before the shared single-node Ray exists: a process holds
one Ray connection, and this one is shut down when the module ends.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's Ray: this module needs its own
        ray.shutdown()
    # A lost node is declared dead after 3 missed health checks of 2 s (default: 5 of 3 s),
    # so the tests see Ray's reaction to the loss rather than its detection delay, while a
    # raylet starved for a few seconds on a busy 2-core machine is not declared dead.
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 2000, "health_check_timeout_ms": 3000,
              "health_check_failure_threshold": 3}
    with pytest.MonkeyPatch.context() as env:
        # Nothing here is preempted; Train's watcher for spot nodes would only log about itself.
        env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        c = Cluster(initialize_head=True,
                    head_node_args={"num_cpus": 2, "resources": {"federated_pool": 2}, "include_dashboard": False,
                                    "_system_config": system})
        ray.init(address=c.address, log_to_driver=False)
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


@pytest.fixture
def cluster_nodes(cluster):
    """The module's cluster; every worker node a test added is removed after it, pass or fail."""
    yield cluster
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
