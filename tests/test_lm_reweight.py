"""lm_reweight: the text domains (deterministic, held-out text unseen, corrupted domains
really corrupted), the transformer (tied head, SDPA equal to written-out causal attention),
the bilevel objectives against per-domain references, and the quick run's table/plot/CSV."""
import collections
import math

import pytest
import torch
import torch.nn.functional as F

from torchbilevel import __main__ as cli
from torchbilevel import text
from torchbilevel.experiments import lm_reweight as L
from torchbilevel.experiments.demo import demo
from torchbilevel.experiments.records import final_rows
from torchbilevel.experiments.transformer import TinyGPT

TINY = dict(n_bytes=4000, context=16, batch_size=2, val_batch=2, eval_windows=8, d_model=32,
            layers=1, heads=2, steps=4, seconds=None, eval_every=2, eval_seconds=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def domains():
    return text.build_domains(20_000)


# ------------------------------------------------------------------ data

def test_encode_decode_round_trip():
    s = "def f(x):\n    return x ** 2  # é"
    tokens = text.encode(s)
    assert tokens.dtype == torch.int64 and tokens.max() < text.VOCAB
    assert text.decode(tokens) == s and len(tokens) == len(s.encode())


def test_domains_are_sized_deterministic_and_hold_out_the_validation_text(domains):
    again = text.build_domains(20_000)
    assert domains.names == text.DOMAINS
    for a, b in zip(domains.train, again.train):
        assert a.numel() == 20_000 and torch.equal(a, b)
    assert torch.equal(domains.val, again.val) and domains.val.numel() > 10_000
    other_seed = text.build_domains(20_000, seed=1)
    k = {d: i for i, d in enumerate(text.DOMAINS)}
    assert torch.equal(other_seed.train[k["docs"]], domains.train[k["docs"]])
    assert not torch.equal(other_seed.train[k["random"]], domains.train[k["random"]])
    # the held-out topics are in no training domain: no 200-byte piece of them occurs there
    docs = text.decode(text.build_domains(400_000).train[k["docs"]])
    val = text.decode(domains.val)
    pieces = [val[i:i + 200] for i in range(0, len(val) - 200, 5000)]
    assert len(pieces) > 5 and not any(p in docs for p in pieces)
    # code is Python source
    assert "def " in text.decode(domains.train[k["code"]]) and "import " in text.decode(domains.train[k["code"]])


def _entropy_bits(tokens):
    p = torch.bincount(tokens, minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def test_corrupted_domains_are_really_corrupted(domains):
    k = {d: i for i, d in enumerate(text.DOMAINS)}
    docs, shuffled = (text.decode(domains.train[k[d]]) for d in ("docs", "shuffled"))
    # shuffled: the documentation's own words (same vocabulary) ...
    doc_words, shuf_words = docs.split(), shuffled.split()
    common = set(doc_words) & set(shuf_words)
    assert sum(w in common for w in shuf_words[:-1]) > 0.95 * (len(shuf_words) - 1)
    # ... but word pairs of the documentation are rare in it (order destroyed)
    pairs = lambda ws: collections.Counter(zip(ws, ws[1:]))
    doc_pairs, shuf_pairs = pairs(doc_words), pairs(shuf_words)
    top = [p for p, _ in doc_pairs.most_common(30)]
    n, freq = len(shuf_words), collections.Counter(shuf_words)
    chance = sum(freq[a] * freq[b] / n for a, b in top)  # expected count of the pair in random order
    assert sum(doc_pairs[p] for p in top) > 4 * sum(shuf_pairs[p] for p in top)
    assert sum(shuf_pairs[p] for p in top) < 2 * chance + 10
    # random: characters uniform over the 96-symbol alphabet (entropy log2 96 = 6.58 bits)
    ent = {d: _entropy_bits(domains.train[k[d]]) for d in text.DOMAINS}
    assert abs(ent["random"] - math.log2(96)) < 0.02
    assert ent["docs"] < 5.0 and ent["code"] < 5.2 and ent["random"] > ent["docs"] + 1.5
    counts = torch.bincount(domains.train[k["random"]], minlength=256)
    used = counts[counts > 0]
    assert used.numel() == 96 and used.max() < 1.25 * used.min() + 60


def test_window_stream_is_seeded_and_targets_are_the_next_tokens(domains):
    a = text.window_stream(domains.train, 3, 16, seed=5)
    b = text.window_stream(domains.train, 3, 16, seed=5)
    batch = next(a)
    assert batch.shape == (4, 3, 17) and torch.equal(batch, next(b))
    # every row is a contiguous piece of its domain
    for d in range(4):
        row = batch[d, 0]
        src = domains.train[d]
        hits = (src.unfold(0, 17, 1) == row).all(1)
        assert hits.any()
    with pytest.raises(ValueError, match="length=64"):
        next(text.window_stream([torch.zeros(10, dtype=torch.int64)], 1, 64, seed=0))
    with pytest.raises(ValueError, match="n_bytes"):
        text.build_domains(10)


# ------------------------------------------------------------------ model

def test_default_model_size_and_tied_head():
    cfg = L.LMReweightConfig()
    model = L.make_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 5_000_000
    assert model.head.weight is model.embed.weight
    y = L.model_parameters(model)
    assert "embed.weight" in y and "head.weight" not in y  # one tensor, listed once
    assert sum(v.numel() for v in y.values()) == n


def _reference_attention(q, k, v, is_causal=True, **_):
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_model_uses_sdpa_and_equals_written_out_attention(monkeypatch):
    torch.manual_seed(0)
    model = TinyGPT(d_model=32, layers=2, heads=4, context=16).double()
    tokens = torch.randint(0, 256, (3, 16))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    out = model(tokens)
    assert calls == [True, True]  # one causal SDPA call per block
    monkeypatch.setattr(F, "scaled_dot_product_attention", _reference_attention)
    ref = model(tokens)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    # causal: changing a later token leaves earlier logits unchanged
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    after = model(changed)
    assert torch.equal(after[:, :10], ref[:, :10]) and not torch.equal(after[:, 10], ref[:, 10])


def test_objectives_equal_per_domain_references(domains):
    cfg = L.LMReweightConfig(**TINY)
    model = L.make_model(cfg)
    y = L.model_parameters(model)
    tokens = next(text.window_stream(domains.train, 2, 16, seed=0))
    x = {"logits": torch.tensor([0.5, -1.0, 2.0, 0.0])}
    losses = [F.cross_entropy(model(tokens[d, :, :-1]).reshape(-1, 256), tokens[d, :, 1:].reshape(-1))
              for d in range(4)]
    w = torch.exp(x["logits"]) / torch.exp(x["logits"]).sum()
    g = L.inner_loss(model)(x, y, tokens)
    assert torch.allclose(g, sum(wi * li for wi, li in zip(w, losses)), atol=1e-6)
    f = L.outer_loss(model)(x, y, tokens[0])
    assert torch.allclose(f, losses[0], atol=1e-6)
    # g depends on x: ∂g/∂x_d = w_d (ℓ_d − g)   (softmax Jacobian)
    xg = {"logits": x["logits"].clone().requires_grad_()}
    (dx,) = torch.autograd.grad(L.inner_loss(model)(xg, y, tokens), [xg["logits"]])
    ref = w * (torch.stack(losses) - g)
    assert torch.allclose(dx, ref.detach(), atol=1e-6)


def test_call_check_catches_a_module_that_ignores_its_parameters():
    class Ignoring(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.frozen = self.w.detach().clone()

        def forward(self, t):
            return t.float() * self.frozen  # never reads the parameter it is given

    module = Ignoring()
    with pytest.raises(RuntimeError, match="not the y it was given"):
        L.check_call_sees_parameters(module, L.model_parameters(module), torch.ones(3))
    model = TinyGPT(d_model=16, layers=1, heads=2, context=8)
    L.check_call_sees_parameters(model, L.model_parameters(model), torch.zeros(1, 8, dtype=torch.int64))


# ------------------------------------------------------------------ the run

def test_quick_run_writes_table_plot_and_csv(tmp_path):
    cfg = L.LMReweightConfig(**TINY)
    out = tmp_path / "lm.png"
    result = demo("lm_reweight", cfg, out=str(out), progress=False)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "lm.csv").read_text().startswith("method,step,seconds,val_loss,w_docs")
    for label in L.LABELS.values():
        assert label in result.table
    assert result.table.splitlines()[0].split() == ["method", "step", "seconds", "val_loss", "w_docs",
                                                    "w_code", "w_shuffled", "w_random"]
    assert "Note: first-order" in result.table
    last = {r["method"]: r for r in final_rows(result.record)}
    assert len(last) == 6
    for row in last.values():
        assert "diverged" not in row and row["step"] == 4 and math.isfinite(row["val_loss"])
        assert abs(sum(row[c] for c in L.WEIGHT_COLUMNS) - 1) < 1e-5
    # the frozen rows keep their weights exactly; first-order has ∇x f = 0 so it too
    for name in ("uniform weights", "first-order"):
        assert [last[name][c] for c in L.WEIGHT_COLUMNS] == [0.25] * 4
    assert last["clean domains only"]["w_corrupted"] == 0.0 and last["clean domains only"]["w_docs"] == 0.5
    # the bilevel methods move the weights (BOME's multiplier can be 0 for its first steps)
    for name in ("FdeHBO", "F2SA"):
        assert max(abs(last[name][c] - 0.25) for c in L.WEIGHT_COLUMNS) > 1e-4, name
    # every row starts from the same model
    first = [r for r in result.record if r["step"] == 0]
    assert len({r["val_loss"] for r in first}) == 1


def test_cli_shard_needs_torchrun_and_lm_reweight(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    code = cli.main(["run", "lm_reweight", "--shard", "--no-progress", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "torchrun --nproc-per-node 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "weight_decay", "--shard"])
    assert exc.value.code == 2 and "only lm_reweight" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_short_run_moves_weight_off_random_characters(seed):
    """15 steps of the tiny model: FdeHBO and F2SA cut the random-characters weight from
    0.25 to below 0.2 (measured 0.05-0.12 at seeds 0-2). The shuffled-words domain is not
    reliably cut this early (it shares the documentation's byte statistics, which is what
    the model learns first), so nothing is asserted about it."""
    cfg = L.LMReweightConfig(**dict(TINY, methods=("fdehbo", "f2sa"), steps=15, eval_every=15,
                                    seed=seed, n_bytes=20_000, batch_size=4))
    last = {r["method"]: r for r in final_rows(L.run(cfg))}
    for name in ("FdeHBO", "F2SA"):
        assert last[name]["step"] == 15 and last[name]["w_random"] < 0.2, (name, last[name])


# ------------------------------------------------------------------ two processes (gloo, CPU)

_DP = dict(TINY, steps=4, eval_every=2, methods=("fdehbo", "f2sa", "bome", "uniform"))


def _dp_worker(rank, world, init_file, out_dir):
    import datetime
    import json
    import os

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        out = {}
        for fsdp in (False, True):
            try:
                out[str(fsdp)] = L.run(L.LMReweightConfig(**_DP, shard=True, fsdp=fsdp))
            except L.CallIgnoresParameters as err:
                out[str(fsdp)] = str(err)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
        dist.barrier()          # every rank done before the group goes (gloo aborts a rank left alone)
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_with_one_process_or_fail_clearly(tmp_path):
    """torchrun's --shard path at 2 ranks, each holding half of every batch: with whole model
    replicas (fsdp=False) and with FSDP2 (fsdp=True: 1/2 of every parameter per rank) every
    row equals one process on the full batches (float32: 1e-3 relative for FdeHBO, whose
    finite-difference products amplify rounding, and F2SA, whose λ-scaled difference of
    two x-gradients does; 1e-5 for the others)."""
    import json
    import os

    from spawning import spawn
    rdv = str(tmp_path / "rendezvous")
    spawn(_dp_worker, (2, rdv, str(tmp_path)), 2, [os.path.join(tmp_path, f"rank{r}.json") for r in range(2)], rdv)
    ranks = [json.load(open(os.path.join(tmp_path, f"rank{r}.json"))) for r in range(2)]
    one = L.run(L.LMReweightConfig(**_DP))
    cols = ["val_loss", *L.WEIGHT_COLUMNS]
    for fsdp in ("False", "True"):
        results = [r[fsdp] for r in ranks]
        assert not isinstance(results[0], str), results          # FSDP2 runs (never a clear refusal now)
        for rec in results:
            assert [(r["method"], r["step"]) for r in rec] == [(r["method"], r["step"]) for r in one]
            for a, b in zip(rec, one):
                # float32: FdeHBO's finite differences and F2SA's λ(∇x g(y) − ∇x g(z)) amplify
                # the rounding of a different reduction order
                tol = 1e-3 if a["method"] in ("FdeHBO", "F2SA") else 1e-5
                for c in cols:
                    assert abs(a[c] - b[c]) <= tol * max(abs(b[c]), 1e-3), (fsdp, a["method"], a["step"], c)
