"""The server's update checks (server/update_checks.py): screening before aggregation, the guarded step after."""

import json

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from pollen.codec import CodecError, TopK, decode, encode, layout_of
from pollen.config import ConfigError, load_config
from pollen.data import partitions
from pollen.run_folder import RoundRecord
from pollen.server.app import run_federation
from pollen.server.momentum import ServerMomentum
from pollen.server.update_checks import (KnownClients, StepGuard, Update, UpdateChecks, cosines, opposed,
                                         screen_updates, simulated_clients)
from pollen.server.uplink import RoundTraffic, accept_evaluations
from pollen.simulations.report import round_line
from strategy_replies import (TINY, UNBOUNDED, config_of, flower_round, metrics, numpy_of, pollen_round,
                              pollen_state, sampling, strategy_of)

rng = np.random.default_rng(7)
GLOBAL = {"w": rng.normal(size=(20, 30)).astype(np.float32), "b": rng.normal(size=(30,)).astype(np.float32)}
CODEC = TopK(density=0.1)
ROBUST = {"sparse-fedavg": {}, "fedavg": {}, "sparse-median": {"min_senders": 1},
          "sparse-trimmed-mean": {"beta": 0.4}, "fedmedian": {}}

pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


# Honest clients of one round share the descent direction, each with noise of its own data.
DESCENT = {k: rng.normal(size=v.shape) for k, v in GLOBAL.items()}


def honest_delta() -> dict:
    return {k: (0.01 * (DESCENT[k] + rng.normal(size=v.shape))).astype(np.float32) for k, v in GLOBAL.items()}


def default_checks(name: str = "sparse-fedavg", clients: int = 5, overrides=(), known: KnownClients | None = None):
    return UpdateChecks.of(config_of(name, clients, overrides=overrides), known)


def is_finite(state) -> bool:
    return all(np.isfinite(array.numpy()).all() for array in state.arrays.values())


def updates(norms, examples=None) -> list[Update]:
    return [Update(i + 1, n, norm) for i, (norm, n) in enumerate(zip(norms, examples or [10] * len(norms)))]


# --- screening ------------------------------------------------------------------------

def test_an_update_far_above_the_rounds_median_norm_is_rejected():
    verdicts = screen_updates(updates([1.0, 1.2, 0.9, 1.1, 50.0]), default_checks())
    assert [v.weight for v in verdicts] == [10, 10, 10, 10, None]
    assert verdicts[4].reason == "update norm 50 is above 10 x the round's median 1.1"


def test_the_median_rules_need_three_updates():
    assert all(v.weight == 10 for v in screen_updates(updates([1.0, 1e6]), default_checks()))
    assert all(v.weight == 10 for v in screen_updates(updates([1.0, 1.0, 1e6], [10, 10, 10]),
                                                        default_checks(overrides=["federation.max_norm_ratio=0"])))


def test_the_absolute_norm_bound_and_an_overflowing_norm_reject_even_a_lone_update():
    checks = default_checks(overrides=["federation.max_update_norm=5"])
    assert screen_updates(updates([6.0]), checks)[0].reason == "update norm 6 is above federation.max_update_norm 5"
    assert screen_updates(updates([float("inf")]), default_checks())[0].reason == "update norm overflows"


def test_a_claim_above_the_rounds_median_is_clipped_when_the_size_is_unknown():
    verdicts = screen_updates(updates([1.0] * 5, [40, 50, 30, 45, 100_000]), default_checks())
    assert [v.weight for v in verdicts] == [40, 50, 30, 45, 450]
    assert verdicts[4].clipped and verdicts[4].reason == "num-examples 100000 clipped to 450 (10 x the round's median 45)"
    assert not any(v.clipped for v in verdicts[:4])


def test_a_known_size_must_be_claimed_exactly_and_is_never_clipped():
    known = KnownClients(sizes={1: 40, 5: 10_000})
    verdicts = screen_updates(updates([1.0] * 5, [41, 50, 30, 45, 10_000]), default_checks(known=known))
    assert verdicts[0].weight is None and verdicts[0].reason == "num-examples 41 is not the 40 its partition holds"
    assert verdicts[4].weight == 10_000 and not verdicts[4].clipped


def test_a_claim_above_max_examples_is_rejected():
    verdict = screen_updates(updates([1.0], [10**300]), default_checks())[0]
    assert verdict.weight is None and verdict.reason == "num-examples 1e+300 is above federation.max_examples 1000000"


def directed(vectors) -> list[Update]:
    """Updates with flat dense directions (indices 0..n-1)."""
    return [Update(i + 1, 10, float(np.linalg.norm(v)), (np.arange(len(v)), np.asarray(v, float)))
            for i, v in enumerate(vectors)]


def test_cosines_are_between_unit_directions_dense_or_sparse_and_skip_updates_without_one():
    ups = directed([[3.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    matrix, judged = cosines(ups)
    h = 2 ** -0.5
    np.testing.assert_allclose(matrix, [[1, h, 0], [h, 1, -h], [0, -h, 1]], atol=1e-12)
    assert judged == [0, 1, 2]
    sparse = [Update(1, 10, 1.0, (np.array([3]), np.array([1.0]))), Update(2, 10, 1.0, None),
              Update(3, 10, 2.0, (np.array([0, 3]), np.array([0.0, -2.0]))), Update(4, 10, 0.0, (np.array([1]), np.array([0.0])))]
    matrix, judged = cosines(sparse)
    np.testing.assert_allclose(matrix, [[1, -1], [-1, 1]])
    assert judged == [0, 2]


def test_a_round_without_a_shared_direction_is_not_judged():
    orthogonal = np.eye(6)[:5] * 3.0
    # one update against two others; the majority (the rest) shares no direction
    vectors = [*orthogonal, -orthogonal[0] - orthogonal[1] + 0.1 * np.eye(6)[5]]
    assert cosines(directed(vectors))[0][5, :2].max() < -0.7
    assert opposed(directed(vectors), 0.0) == {}
    assert all(v.weight == 10 for v in screen_updates(directed(vectors), default_checks()))


def test_an_update_that_opposes_the_round_is_rejected_and_minus_one_turns_the_check_off():
    base = rng.normal(size=50)
    vectors = [base + 0.3 * rng.normal(size=50) for _ in range(4)] + [-base]
    verdicts = screen_updates(directed(vectors), default_checks())
    assert [v.weight for v in verdicts] == [10, 10, 10, 10, None]
    assert verdicts[4].reason.startswith("update direction opposes the round's: cosine -0.")
    assert verdicts[4].reason.endswith("with the majority is below federation.min_cosine 0")
    off = default_checks(overrides=["federation.min_cosine=-1"])
    assert all(v.weight == 10 for v in screen_updates(directed(vectors), off))
    assert all(v.weight == 10 for v in screen_updates(directed(vectors[3:]), default_checks()))  # two: no judge


def noisy_round(seed: int, honest: int, flipped: int, noise: float = 3.0) -> list:
    r = np.random.default_rng(seed)
    base = r.normal(size=200)
    return ([base + noise * r.normal(size=200) for _ in range(honest)]
            + [-(base + noise * r.normal(size=200)) for _ in range(flipped)])


@pytest.mark.parametrize("seed", [4, 12])
@pytest.mark.parametrize("flipped", [2, 4])
def test_sign_flipped_updates_of_a_minority_are_all_rejected_and_the_honest_stay(seed, flipped):
    vectors = noisy_round(seed, 10 - flipped, flipped)
    verdicts = screen_updates(directed(vectors), default_checks())
    assert [v.weight for v in verdicts] == [10] * (10 - flipped) + [None] * flipped
    if flipped == 4:  # against the sum of all the others, the attackers hide: no honest update stands out
        matrix = cosines(directed(vectors))[0]
        assert (matrix.sum() - np.trace(matrix)) / 90 < 0  # the mean pairwise cosine of the round


def test_a_tie_between_two_sides_is_not_judged():
    assert opposed(directed(noisy_round(7, 5, 5, noise=1.0)), 0.0) == {}
    assert set(opposed(directed(noisy_round(7, 6, 4, noise=1.0)), 0.0)) == {6, 7, 8, 9}


@pytest.mark.parametrize("name", ["sparse-fedavg", "fedavg"])
def test_a_sign_flipped_update_is_rejected_and_the_round_is_the_honest_clients_alone(name):
    flipped = {k: -v for k, v in honest_delta().items()}
    outcome, state, honest_only = hostile_round(name, [encode(flipped, CODEC)])
    assert outcome.traffic.rejected == 1 and "direction opposes" in outcome.traffic.rejections[0]["reason"]
    assert_same_arrays(state, honest_only)


def test_a_simulation_knows_every_partitions_size_and_names_it():
    config = load_config(TINY)
    clients = simulated_clients(config)
    parts = partitions(config, config.federation.num_clients)
    assert clients.sizes == {p + 1: len(part) for p, part in enumerate(parts)}
    assert clients.name(3) == "partition 2" and KnownClients().name(12345) == "node 12345"


# --- the reproduced failures, each through a whole round --------------------------------

def hostile_round(name: str, hostile: list, sizes=None, checks=None, rounds: int = 1, momentum=None):
    """Four honest sparse updates from nodes 1-4 and ``hostile`` payloads from nodes 5...; the last outcome.

    Returns (outcome, state, the state of the same rounds with the hostile nodes' replies as errors).
    """
    clients = 4 + len(hostile)
    checks = checks or default_checks(name, clients)
    honest = [encode(honest_delta(), CODEC) for _ in range(4)]
    runs = []
    for payloads in (honest + hostile, honest + [Error(code=0, reason="absent")] * len(hostile)):
        state = pollen_state(strategy_of(name, clients, ROBUST.get(name)), GLOBAL,
                             momentum=momentum() if momentum else None, downlink=TopK(density=1.0))
        for server_round in range(1, rounds + 1):
            outcome = pollen_round(state, [], sizes or [10] * clients, CODEC, server_round, payloads=payloads,
                                   checks=checks)
        runs.append((outcome, state))
    return runs[0][0], runs[0][1], runs[1][1]


def assert_same_arrays(state, expected) -> None:
    for name in GLOBAL:
        np.testing.assert_array_equal(state.arrays[name].numpy(), expected.arrays[name].numpy())


@pytest.mark.parametrize("name", ["sparse-fedavg", "fedavg"])
def test_values_near_float32s_limit_in_two_rounds_are_rejected_and_the_server_goes_on(name):
    near_limit = encode({k: np.full(v.shape, 3.3e38, np.float32) for k, v in GLOBAL.items()}, CODEC)
    outcome, state, honest_only = hostile_round(name, [near_limit], rounds=2)
    assert outcome.traffic.rejected == 1 and "update norm" in outcome.traffic.rejections[0]["reason"]
    assert outcome.step_refused is None and is_finite(state)
    assert_same_arrays(state, honest_only)


def test_without_update_checks_the_guard_refuses_the_overflowing_round_and_keeps_the_model():
    near_limit = encode({k: np.full(v.shape, 3.3e38, np.float32) for k, v in GLOBAL.items()}, CODEC)
    outcome, state, _ = hostile_round("sparse-fedavg", [near_limit], checks=UNBOUNDED, rounds=2)
    assert outcome.step_refused == "the new global model is not finite (w)" and is_finite(state)


def test_a_huge_num_examples_with_ordinary_values_is_rejected_in_round_one():
    outcome, state, honest_only = hostile_round("fedavg", [encode(honest_delta(), CODEC)] * 2,
                                                sizes=[10, 10, 10, 10, 1.7e308, 1.7e308])
    assert outcome.traffic.rejected == 2 and outcome.step_refused is None and is_finite(state)
    assert all("above federation.max_examples" in r["reason"] for r in outcome.traffic.rejections)
    assert_same_arrays(state, honest_only)


@pytest.mark.parametrize("name", list(ROBUST))
@pytest.mark.parametrize("scale, values", [(1e6, None), (1.0, 1e30)])
def test_a_scaled_update_is_rejected_and_the_round_is_the_honest_clients_alone(name, scale, values):
    delta = honest_delta()
    hostile = {k: (np.full(v.shape, values, np.float32) if values else v * np.float32(scale)) for k, v in delta.items()}
    outcome, state, honest_only = hostile_round(name, [encode(hostile, CODEC)])
    assert outcome.traffic.rejected == 1 and outcome.traffic.accepted == 4 and is_finite(state)
    assert_same_arrays(state, honest_only)


def test_a_python_int_beyond_float_range_is_rejected_and_the_honest_replies_still_count():
    outcome, state, honest_only = hostile_round("fedavg", [encode(honest_delta(), CODEC)],
                                                sizes=[10, 10, 10, 10, 10**309])
    assert outcome.traffic.accepted == 4 and "not a finite number" in outcome.traffic.rejections[0]["reason"]
    assert_same_arrays(state, honest_only)


def test_a_clipped_claim_weighs_as_much_as_flowers_fedavg_gives_the_clipped_weight():
    deltas = [honest_delta() for _ in range(5)]
    sizes = [40, 50, 30, 45, 100_000]
    state = pollen_state(strategy_of("fedavg", 5), GLOBAL)
    outcome = pollen_round(state, deltas, sizes, checks=default_checks("fedavg", 5))
    assert [c["client"] for c in outcome.traffic.clipped] == ["node 5"]
    expected = flower_round(strategy_of("fedavg", 5), GLOBAL, deltas, [40, 50, 30, 45, 450])
    for name in GLOBAL:
        np.testing.assert_allclose(state.arrays[name].numpy(), expected[name], rtol=1e-6)


def test_a_single_bit_flip_is_rejected_by_the_crc_and_the_honest_updates_applied():
    blob = bytearray(encode(honest_delta(), CODEC)["update"].data)
    blob[len(blob) // 2] ^= 0x40
    flipped = encode(honest_delta(), CODEC)
    flipped["update"].data = bytes(blob)
    outcome, state, honest_only = hostile_round("sparse-fedavg", [flipped])
    assert outcome.traffic.rejections == [{"client": "node 5", "reason": "corrupted payload: CRC-32 mismatch"}]
    assert_same_arrays(state, honest_only)


# --- the guard after aggregation ------------------------------------------------------

def test_a_refused_step_restores_the_strategys_state_and_the_servers_momentum():
    scaled = {k: np.float32(1e6) * v for k, v in honest_delta().items()}
    for name, momentum in (("fedavgm", None), ("sparse-fedavg", lambda: ServerMomentum(1.0, 0.6, 0.0, 10))):
        # Five of nine clients hostile: the median rules cannot tell; the step bound does.
        outcome, state, _ = hostile_round(name, [encode(scaled, CODEC)] * 5, momentum=momentum,
                                          checks=default_checks(name, 9))
        assert outcome.step_refused.startswith("the global step") and "max_step_ratio 10" in outcome.step_refused
        assert_same_arrays(state, pollen_state(strategy_of(name, 9), GLOBAL))
        if name == "fedavgm":
            assert state.strategy.momentum_vector is None
        else:
            assert state.momentum.velocity == {}


def test_anything_raised_inside_the_guard_refuses_the_round_instead_of_escaping():
    state = pollen_state(strategy_of("fedavg"), GLOBAL)
    before = state.strategy
    with StepGuard(state, default_checks(), server_round=3) as guard:
        state.strategy.fraction_train = 0.0  # state the refused round must not keep
        raise CodecError("update contains NaN or infinity")
    assert guard.refused == "CodecError: update contains NaN or infinity"
    assert state.strategy is not before and state.strategy.fraction_train == 1.0


def test_keyboard_interrupt_is_not_swallowed():
    state = pollen_state(strategy_of("fedavg"), GLOBAL)
    with pytest.raises(KeyboardInterrupt):
        with StepGuard(state, default_checks(), server_round=1):
            raise KeyboardInterrupt


def test_a_zero_model_is_only_checked_for_finiteness():
    zeros = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    state = pollen_state(strategy_of("fedavg"), zeros)
    guard = StepGuard(state, default_checks(), server_round=1)
    guard.check(state.arrays, pollen_state(strategy_of("fedavg"), GLOBAL).arrays)  # any finite step


# --- federated evaluation -------------------------------------------------------------

def evaluation_reply(values: dict, node: int) -> Message:
    from strategy_replies import configure

    instruction = configure(strategy_of("fedavg"), GLOBAL)[node - 1]
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=instruction)


def test_evaluation_replies_with_metrics_no_average_survives_are_rejected():
    good = {"num-examples": 10, "accuracy": 0.5, "loss": 1.0}
    replies = [evaluation_reply(good, 1), evaluation_reply({**good, "num-examples": 10**309}, 2),
               evaluation_reply({**good, "accuracy": float("inf")}, 3)]
    traffic = RoundTraffic()
    kept = accept_evaluations(replies, default_checks(clients=3), traffic=traffic, server_round=1)
    assert len(kept) == 1 and kept[0] is replies[0] and traffic.rejected == 2
    assert all(r["reason"].startswith("evaluation: metric") for r in traffic.rejections)


# --- the run record and the console -----------------------------------------------------

class HostileGrid:
    """A simulation's Grid whose partition 0 scales its honest update a millionfold (codec of the run)."""

    def __new__(cls, inner, codec, layout):
        from pollen.simulations.grid_wrapper import GridWrapper

        class Scaled(GridWrapper):
            def send_and_receive(self, messages, *, timeout=None):
                replies = list(self.inner.send_and_receive(messages, timeout=timeout))
                for reply in replies:
                    if reply.metadata.src_node_id == 1 and not reply.has_error() and "arrays" in reply.content:
                        delta = decode(reply.content["arrays"], layout, codec)
                        reply.content["arrays"] = encode({k: v * np.float32(1e6) for k, v in delta.items()}, codec)
                return replies

        return Scaled(inner)


def test_a_simulation_with_a_hostile_client_still_learns_and_records_who_was_rejected(tmp_path):
    from pollen.client.app import app as client_app
    from pollen.config import run_config_of
    from pollen.data import num_classes
    from pollen.models import initial_arrays
    from pollen.run_folder import RunFolder
    from pollen.simulations.inprocess import InProcessGrid

    import torch

    # Every client every round, so partition 0 always sends.
    config = load_config(TINY, ["federation.rounds=3", "federation.clients_per_round=10"])
    layout = layout_of(initial_arrays(config.model, num_classes(config.data), config.seed))
    inner = InProcessGrid(client_app, config.federation.num_clients, run_config_of(config))
    folder = RunFolder(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = run_federation(HostileGrid(inner, config.codec.build(), layout), config, folder,
                                 clients=simulated_clients(config))
    finally:
        torch.set_num_threads(threads)
    assert records[-1].accuracy > 0.4  # 0.07-0.11 when the scaled update got through
    for line in folder.records_path.read_text().splitlines()[1:]:
        entry = json.loads(line)
        assert [r["client"] for r in entry["rejected_updates"]] == ["partition 0"]
        assert "above 10 x the round's median" in entry["rejected_updates"][0]["reason"]
        assert entry["step_refused"] is None


def test_the_console_line_names_each_rejected_or_clipped_client_and_a_refused_step():
    record = RoundRecord(round=2, accuracy=0.5, loss=1.0, precision=0.5, recall=0.5, f1=0.5, train_loss=0.9,
                         clients=4, rejected=1, failed=0, uplink_bytes=1000, downlink_bytes=2000,
                         dense_uplink_bytes=9000, compression=9.0, round_seconds=1.0, wall_seconds=2.0,
                         rejected_updates=[{"client": "partition 3", "reason": "update norm [big]"}],
                         clipped_weights=[{"client": "node 9", "reason": "num-examples 500 clipped to 450"}],
                         step_refused="the new global model is not finite (w)")
    lines = round_line(record).splitlines()
    assert lines[0].split()[:2] == ["2", "0.5000"] and "4 (-1)" in lines[0]
    assert lines[1:] == ["  rejected partition 3: update norm \\[big]", "  clipped node 9: num-examples 500 clipped to 450",
                         "  step refused, the global model stays: the new global model is not finite (w)"]


# --- configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("federation.max_norm_ratio", ".inf"), ("federation.max_norm_ratio", ".nan"), ("federation.max_norm_ratio", "0.5"),
    ("federation.max_update_norm", "-1"), ("federation.max_update_norm", ".inf"),
    ("federation.max_weight_ratio", "0.9"), ("federation.max_step_ratio", "-0.1"), ("federation.max_step_ratio", ".inf"),
    ("federation.max_examples", "0"), ("federation.server_learning_rate", ".inf"),
    ("federation.min_cosine", "-1.5"), ("federation.min_cosine", ".nan"),
])
def test_config_refuses_bounds_out_of_range(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


def test_config_bounds_can_be_turned_off_and_default_on():
    config = load_config(None, ["federation.max_norm_ratio=0", "federation.max_step_ratio=0"])
    assert (config.federation.max_norm_ratio, config.federation.max_step_ratio) == (0.0, 0.0)
    defaults = load_config(None).federation
    assert (defaults.max_norm_ratio, defaults.max_weight_ratio, defaults.max_step_ratio) == (10.0, 10.0, 10.0)
    assert defaults.max_examples == 1_000_000 and defaults.max_update_norm == 0.0 and defaults.min_cosine == 0.0
