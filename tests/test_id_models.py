"""ID sequential models: contract, causality, padding invariance, learning, RecBole parity."""

import math

import pytest
import torch
import torch.nn.functional as F

from idle_ray.models.caser import Caser
from idle_ray.models.gru4rec import GRU4Rec
from idle_ray.models.registry import build_id_model
from idle_ray.models.sasrec import SASRec

NUM_ITEMS = 20
NAMES = ["sasrec", "gru4rec", "caser"]
SMALL = {
    "sasrec": dict(hidden_size=32, max_len=12),
    "gru4rec": dict(hidden_size=32, max_len=12, gru_size=48),
    "caser": dict(hidden_size=32, max_len=3),
}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and it keeps the tests quick on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(name, **overrides):
    torch.manual_seed(0)
    return build_id_model(name, NUM_ITEMS, **{**SMALL[name], **overrides}).eval()


def left_pad(sequences, length):
    return torch.tensor([[0] * (length - len(seq)) + list(seq) for seq in sequences])


@pytest.mark.parametrize("name", NAMES)
def test_shapes_padding_row_and_scores(name):
    model = small_model(name)
    history = left_pad([[3, 4, 5], [1, 2, 3, 4, 5, 6], [7]], 6)
    assert model.user_states(history).shape == (3, 6, 32)
    assert model.user_state(history).shape == (3, 32)
    assert model.item_table().shape == (NUM_ITEMS + 1, 32)
    assert torch.all(model.item_table()[0] == 0)
    scores = model.full_sort_predict(history)
    assert scores.shape == (3, NUM_ITEMS + 1)
    assert torch.all(scores[:, 0] == float("-inf"))
    assert torch.isfinite(scores[:, 1:]).all()
    # padded positions carry a zero state
    assert torch.all(model.user_states(history)[0, :3] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_full_softmax_over_real_items(name):
    overrides = {"reg_weight": 0.0} if name == "caser" else {}
    model = small_model(name, **overrides)
    history = left_pad([[3, 4, 5], [1, 2, 3, 4, 5, 6]], 6)
    target = torch.tensor([6, NUM_ITEMS])
    expected = F.cross_entropy(model.full_sort_predict(history)[:, 1:], target - 1)
    assert model.calculate_loss(history, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_caser_loss_adds_recbole_l2_term():
    model = small_model("caser")
    history, target = left_pad([[3, 4, 5]], 6), torch.tensor([6])
    plain = F.cross_entropy(model.full_sort_predict(history)[:, 1:], target - 1)
    weights = (model.item_embedding.weight, model.conv_v.weight, model.fc1.weight, model.fc2.weight)
    expected = plain + 1e-4 * sum(w.norm(2) for w in weights)
    assert model.calculate_loss(history, target).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
    model = small_model(name)
    history = torch.tensor([[3, 9, 4, 12, 5, 7, 1, 2], [8, 6, 5, 4, 3, 2, 1, 20]])
    changed = history.clone()
    changed[:, 5] = torch.tensor([15, 16])
    with torch.no_grad():
        before, after = model.user_states(history), model.user_states(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
    assert (before[:, 5] - after[:, 5]).abs().max() > 1e-4


@pytest.mark.parametrize("nonzero_padding_row", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_left_padding_invariance(name, nonzero_padding_row):
    model = small_model(name)
    if nonzero_padding_row:  # as in a checkpoint trained by RecBole, whose init overwrites row 0
        with torch.no_grad():
            model.item_embedding.weight[0].normal_(0.0, 1.0)
    sequences = [[3, 9, 4], [1, 2, 3, 4, 5, 6], [11]]
    with torch.no_grad():
        short, long = left_pad(sequences, 6), left_pad(sequences, 12)
        torch.testing.assert_close(model.user_state(short), model.user_state(long), rtol=0, atol=1e-5)
        states_short, states_long = model.user_states(short), model.user_states(long)
        for row, seq in enumerate(sequences):
            n = len(seq)
            torch.testing.assert_close(states_short[row, -n:], states_long[row, -n:], rtol=0, atol=1e-5)
        # a row alone gives the same state as inside a batch with other paddings
        torch.testing.assert_close(
            model.user_state(left_pad(sequences[:1], 3)), model.user_state(short)[:1], rtol=0, atol=1e-5
        )


def next_item_task():
    """Deterministic task: after item i comes item i + 1 (wrapping N -> 1); histories of 1..6."""
    sequences, targets = [], []
    for last in range(1, NUM_ITEMS + 1):
        for length in (1, 3, 6):
            seq = [(last - length + 1 + j - 1) % NUM_ITEMS + 1 for j in range(length)]
            sequences.append(seq)
            targets.append(last % NUM_ITEMS + 1)
    return left_pad(sequences, 6), torch.tensor(targets)


@pytest.mark.parametrize("name", NAMES)
def test_learns_next_item_pattern(name):
    overrides = {"attn_dropout": 0.0} if name == "sasrec" else {}
    model = small_model(name, dropout=0.0, **overrides).train()
    history, target = next_item_task()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.calculate_loss(history, target).item()
    for _ in range(50):
        optimizer.zero_grad()
        loss = model.calculate_loss(history, target)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        last = model.calculate_loss(history, target).item()
        top1 = model.full_sort_predict(history).argmax(dim=1)
    assert first > 0.9 * math.log(NUM_ITEMS)  # starts near uniform
    assert last < 0.25 * first
    assert torch.equal(top1, target)


def test_sasrec_fully_padded_row_is_finite():
    model = small_model("sasrec")
    history = left_pad([[], [4, 5]], 5)
    assert torch.isfinite(model.user_states(history)).all()
    assert torch.isfinite(model.full_sort_predict(history)[:, 1:]).all()


def test_sasrec_history_longer_than_max_len():
    model = small_model("sasrec", max_len=4)
    history = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    torch.testing.assert_close(model.user_state(history), model.user_state(history[:, -4:]), rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.user_states(history)
    assert model.user_states(left_pad([[1, 2]], 7)).shape == (1, 7, 32)  # long but short enough


def recbole_sasrec_state(model: SASRec, right_padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """RecBole 1.2.1's SASRec forward, written out with our weights: right padding, positions
    arange(T), additive -10000 causal/padding mask, explicit softmax, gather at length - 1."""
    batch, length = right_padded.shape
    x = model.item_embedding(right_padded) + model.position_embedding(torch.arange(length)).unsqueeze(0)
    x = model.embedding_norm(x)
    allowed = (right_padded > 0).view(batch, 1, 1, length) & torch.ones(length, length, dtype=torch.bool).tril()
    additive = (~allowed).float() * -10000.0  # (B, 1, T, T)
    for layer in model.layers:
        heads, width = layer.num_heads, x.size(-1)
        q, k, v = layer.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads) + additive, dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(batch, length, width)
        x = layer.attn_norm(layer.attn_out(context) + x)
        hidden = layer.ffn_in(x)
        hidden = hidden * 0.5 * (1.0 + torch.erf(hidden / math.sqrt(2.0)))  # RecBole's erf GELU
        x = layer.ffn_norm(layer.ffn_out(hidden) + x)
    return x[torch.arange(batch), lengths - 1]


def test_sasrec_matches_recbole_right_padded_forward():
    model = small_model("sasrec", max_len=8)
    sequences = [[3, 9, 4], [1, 2, 3, 4, 5, 6, 7, 8], [11]]
    lengths = torch.tensor([len(s) for s in sequences])
    right = torch.tensor([s + [0] * (8 - len(s)) for s in sequences])
    with torch.no_grad():
        ours = model.user_state(left_pad(sequences, 8))
        reference = recbole_sasrec_state(model, right, lengths)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_gru4rec_matches_plain_gru_on_unpadded_sequence():
    model = small_model("gru4rec")
    seq = torch.tensor([[3, 9, 4, 12]])
    with torch.no_grad():
        output, _ = model.gru(model.item_embedding(seq))
        expected = model.dense(output)[:, -1]
        torch.testing.assert_close(model.user_state(left_pad([[3, 9, 4, 12]], 10)), expected, rtol=0, atol=1e-6)


def test_defaults_follow_recbole():
    sasrec = SASRec(NUM_ITEMS)
    assert (sasrec.hidden_size, sasrec.max_len, len(sasrec.layers)) == (64, 50, 2)
    assert sasrec.layers[0].num_heads == 2 and sasrec.layers[0].ffn_in.out_features == 256
    assert sasrec.layers[0].attn_dropout == 0.5 and sasrec.embedding_dropout.p == 0.5
    assert sasrec.embedding_norm.eps == 1e-12
    gru = GRU4Rec(NUM_ITEMS)
    assert (gru.hidden_size, gru.gru.hidden_size, gru.gru.num_layers, gru.embedding_dropout.p) == (64, 128, 1, 0.3)
    caser = Caser(NUM_ITEMS)
    assert (caser.hidden_size, caser.max_len, caser.conv_v.out_channels, caser.conv_h[0].out_channels) == (64, 5, 8, 16)
    assert caser.dropout.p == 0.4


def test_registry_builds_each_model_and_rejects_unknown():
    for name, cls in [("sasrec", SASRec), ("gru4rec", GRU4Rec), ("caser", Caser)]:
        model = build_id_model(name, 7, hidden_size=16)
        assert type(model) is cls
        assert model.item_table().shape == (8, 16)
    with pytest.raises(ValueError, match="caser, gru4rec, sasrec"):
        build_id_model("bert4rec", 7)
