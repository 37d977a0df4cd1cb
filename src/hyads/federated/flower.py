"""Flower wiring for FedShufde: a NumPyClient per site, a strategy that routes reports through the shuffler
and the validator, a Ray simulation runner, and server/client entry points for real processes.

We use Flower's long-standing `Strategy` / `NumPyClient` API (start_server / start_client for processes,
start_simulation for one machine): it runs unchanged in both modes, which the newer ServerApp/SuperLink
stack only does through a packaged Flower app.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fedshufde import (FedSettings, Shuffler, UpdateValidator, aggregate, chunk_sizes, flatten, get_arrays,
                        privatise, set_arrays, unflatten)
from .models import initial_arrays, local_train, new_model

log = logging.getLogger("hyads.federated")


def _client_class():
    from flwr.client import NumPyClient

    class FedShufdeClient(NumPyClient):
        """One site: holds its data (images, features, head inputs or statistics; never sent) and returns
        privatised update chunks."""

        def __init__(self, data: Any, settings: FedSettings, site: int, fail: bool = False):
            self.data, self.s, self.site, self.fail = data, settings, site, fail
            self.model = None if settings.model == "stats" else new_model(settings.model, settings.seed, settings.shape)

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return initial_arrays(self.s)[0] if self.model is None else get_arrays(self.model)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
            if self.fail:  # simulates a site that drops out in the middle of a round
                raise ConnectionError(f"site {self.site} dropped out")
            rnd = int(config.get("round", 0))
            start = flatten(parameters)
            if self.model is None:  # stats job: the "update" moves the zero start to this site's statistics
                update = np.asarray(self.data["stats"], np.float32) - start
            else:
                set_arrays(self.model, parameters)
                local_train(self.model, self.data, self.s, seed=self.s.seed + 1000 * rnd + self.site)
                update = flatten(get_arrays(self.model)) - start
            # Noise from the OS, not the experiment seed: a server that knows the seed could subtract it.
            rng = np.random.default_rng()
            chunks, _ = privatise(update, self.s, rng)
            return chunks, 1, {}

    return FedShufdeClient


def make_client(data: Any, settings: FedSettings, site: int, fail: bool = False):
    return _client_class()(data, settings, site, fail)


@dataclass
class RoundLog:
    round: int
    seconds: float
    reports: int
    failures: int
    rejected: list[str] = field(default_factory=list)
    bytes_per_client: int = 0


def make_strategy(settings: FedSettings, n_clients: int, fraction_fit: float = 1.0,
                  evaluate: Callable[[list[np.ndarray]], dict[str, float]] | None = None,
                  eval_every: int = 0, min_fit: int | None = None):
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    class FedShufdeStrategy(FedAvg):
        """FedAvg whose aggregation sees only shuffled, anonymous, validated chunk reports."""

        def __init__(self) -> None:
            self.global_arrays, self.var_index = initial_arrays(settings)
            dim = sum(a.size for a in self.global_arrays)
            self.sizes = chunk_sizes(dim, settings.chunks)
            self.shuffler = Shuffler(settings.chunks)
            self.validator = UpdateValidator(self.sizes, settings.clip, settings.sigma)
            self.rounds: list[RoundLog] = []
            self.evaluations: list[dict[str, Any]] = []
            self._t0 = time.perf_counter()
            n_fit = max(1, int(math.ceil(fraction_fit * n_clients)))
            super().__init__(
                fraction_fit=fraction_fit, fraction_evaluate=0.0, min_fit_clients=min_fit or n_fit,
                min_evaluate_clients=0, min_available_clients=min_fit or n_fit, accept_failures=True,
                initial_parameters=ndarrays_to_parameters(self.global_arrays),
                on_fit_config_fn=lambda rnd: {"round": rnd})

        def configure_fit(self, server_round, parameters, client_manager):
            self._t0 = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            reports = []
            for _, res in results:
                try:
                    reports.append([np.asarray(a) for a in parameters_to_ndarrays(res.parameters)])
                except Exception as exc:  # undecodable payload: drop it, keep the round going
                    log.warning("round %d: undecodable report dropped (%s)", server_round, exc)
            columns = self.shuffler(reports)
            rejected = list(self.shuffler.dropped)
            for r in rejected:
                log.warning("round %d: shuffler dropped a %s", server_round, r)
            mean, more = aggregate(columns, self.validator)
            rejected += more
            if mean is not None:
                vec = flatten(self.global_arrays) + settings.server_lr * mean.astype(np.float32)
                self.global_arrays = unflatten(vec, self.global_arrays)
                # Noise can push a BatchNorm running variance below zero (NaN at inference): keep it positive.
                for i in self.var_index:
                    np.maximum(self.global_arrays[i], 1e-5, out=self.global_arrays[i])
            else:
                log.warning("round %d: no valid report, global model unchanged", server_round)
            nbytes = int(np.mean([sum(a.nbytes for a in r) for r in reports])) if reports else 0
            self.rounds.append(RoundLog(server_round, time.perf_counter() - self._t0, len(reports), len(failures),
                                        rejected, nbytes))
            return ndarrays_to_parameters(self.global_arrays), {}

        def evaluate(self, server_round, parameters):
            if evaluate is None or server_round == 0 or not eval_every or server_round % eval_every:
                return None
            res = evaluate(self.global_arrays)
            self.evaluations.append({"round": server_round, **res})
            return 0.0, res

    return FedShufdeStrategy()


def run_simulation(client_data: list[Any], settings: FedSettings, rounds: int,
                   fraction_fit: float = 1.0, evaluate: Callable | None = None, eval_every: int = 0,
                   failing: frozenset[int] = frozenset(), num_cpus: int = 2):
    """A Flower (Ray) simulation with one virtual client per entry of `client_data` (an array, or a dict of
    arrays); returns the strategy (global model arrays, per-round logs, evaluations)."""
    import flwr
    from flwr.server import ServerConfig
    from flwr.simulation import start_simulation

    import shutil
    import tempfile

    n = len(client_data)
    strategy = make_strategy(settings, n, fraction_fit, evaluate, eval_every)
    # Each site's data goes to its own .npy/.npz file: the client function then carries only a path (Ray
    # would otherwise pickle every site's data into every client call).
    tmp = Path(tempfile.mkdtemp(prefix="hyads-fed-"))
    paths = []
    for i, data in enumerate(client_data):
        if isinstance(data, dict):
            paths.append(str(tmp / f"site{i}.npz"))
            np.savez(paths[-1], **data)
        else:
            paths.append(str(tmp / f"site{i}.npy"))
            np.save(paths[-1], data)

    def load(path: str) -> Any:
        if path.endswith(".npz"):
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        return np.load(path)

    def client_fn(context: Any):
        pid = int(context.node_config["partition-id"])
        return make_client(load(paths[pid]), settings, pid, pid in failing).to_client()

    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        start_simulation(client_fn=client_fn, num_clients=n, config=ServerConfig(num_rounds=rounds),
                         strategy=strategy, client_resources={"num_cpus": 1},
                         ray_init_args={"num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": False,
                                        "configure_logging": False})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del flwr
    return strategy
