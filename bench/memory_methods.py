"""Peak memory per method in bytes per parameter, one process: the state a method keeps
(``state_dict`` tensors) and the peak a step adds above it, on an MLP (x = a body of
Linear(W, W) blocks, y = a head Linear(W, C)), float32, CPU.

    python bench/memory_methods.py                 # width 512, 6 blocks, head of 100 classes

The step's peak is measured with bench/peak_memory.py on CPU (a dispatch-mode tracker: every
tensor an operator creates, counted until its storage is freed; CPU keeps no allocator
statistics) and with torch.cuda.max_memory_allocated on CUDA (bench/gpu.py's ``memory``
section), on the second step (which evaluates the previous iterate too).  One JSON line
per method and donation (``step(..., donate=True)`` for the methods that update in place):
parameters, state and step-peak bytes, both per parameter, and the step peak in units of
the parameter bytes.  The state counted is what the step is given (``state_dict``'s tensors,
distinct storages once).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import torchbilevel as tb                       # noqa: E402
from peak_memory import peak_tensor_bytes      # noqa: E402


def network(width, blocks, classes, batch, device):
    """(net, batch, cross-entropy objective through tb.nn.call): ``blocks`` Linear(W, W) + tanh
    and a head Linear(W, classes), seeded."""
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, classes)).to(device)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(batch, width, generator=gen).to(device),
            torch.randint(0, classes, (batch,), generator=gen).to(device))
    return net, data, lambda x, y, b: F.cross_entropy(tb.nn.call(net, x, y, b[0]), b[1])


def rows(width=512, blocks=6, classes=100, batch=64, device="cpu", split="head"):
    """One dict per method: parameters, state and step-peak bytes per parameter (CUDA: peak
    allocated bytes above what was allocated before the step; CPU: the dispatch tracker).
    ``split="head"``: y = the head (3 % of the parameters), x = the body (hyper-representation);
    ``"all"``: y = every weight, x = one log weight decay per layer (hyperparameter tuning,
    the shape of LLM data reweighting: the inner problem is the whole model)."""
    net, data, ce = network(width, blocks, classes, batch, device)
    if split == "head":
        prob = tb.Bilevel(outer=ce, inner=lambda x, y, b: ce(x, y, b) + 1e-3 * sum((w ** 2).sum() for w in y.values()))
        x, y = tb.nn.split(net, inner=[str(len(net) - 1)])
    else:
        _, y = tb.nn.split(net, inner=[str(i) for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)])
        keys = sorted(y)
        x = {"log_decay": torch.full((len(keys),), -7.0, device=device)}
        decay = lambda x, y: sum(torch.exp(x["log_decay"][i]) * (y[k] ** 2).sum() for i, k in enumerate(keys))
        fy = lambda x, y, b: F.cross_entropy(tb.nn.call(net, {}, y, b[0]), b[1])
        prob = tb.Bilevel(outer=fy, inner=lambda x, y, b: fy(x, y, b) + decay(x, y))
    n = sum(t.numel() for t in x.values()) + sum(t.numel() for t in y.values())
    kw = dict(lr_x=0.01, lr_y=0.05, lr_v=0.05, radius=10.0)
    algos = {"fdehbo": lambda: tb.fdehbo(prob, eta_x=0.5, eta_y=0.5, eta_v=0.5, **kw),
             "fmbo": lambda: tb.fmbo(prob, eta_x=0.5, eta_y=0.5, eta_v=0.5, **kw),
             "f2sa": lambda: tb.f2sa(prob, lr_x=0.01, lr_y=0.05, lr_z=0.05),
             "bome": lambda: tb.bome(prob, lr_x=0.01, lr_y=0.05),
             "first_order (double_loop, 1 inner step)": lambda: tb.double_loop(prob, tb.first_order(), lr_x=0.01,
                                                                                inner_steps=1, lr_y=0.05),
             "pzobo (double_loop, N=1, Q=1)": lambda: tb.double_loop(prob, tb.pzobo(1, 0.05, directions=1, mu=1e-3),
                                                                     lr_x=0.01, inner_steps=1, lr_y=0.05)}
    out = [adam_row(net, data, n, device)]
    for (name, build), donate in [(item, d) for item in algos.items() for d in (False, True)]:
        algo = build()
        if donate and not _donates(algo):
            continue
        s = algo.step(algo.init(x, y), data, data)
        holder = [s]
        state = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in _tensors(algo, s)}.values())
        step_kw = {"donate": True} if donate else {}

        def step():
            holder[0] = algo.step(holder[0], data, data, **step_kw)
        peak, how = step_peak(step, device)
        out.append({"method": name, "donate": donate, "params": n, "state_bytes_per_param": state / n,
                    "step_peak_bytes_per_param": peak / n, "step_peak_x_param_bytes": peak / (4 * n),
                    "total_bytes_per_param": (state + peak) / n, "measured_with": how})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", choices=["head", "all"], default="head")
    ap.add_argument("--time", action="store_true",
                    help="median step time, plain and donated alternating (one torch thread), instead of bytes")
    ap.add_argument("--table", action="store_true",
                    help="both splits, then the Markdown table of bytes per parameter and the largest model "
                         "that fits 8 GPUs of 80 GB with FSDP2, computed from the measured figures")
    a = ap.parse_args()
    if a.time:
        for line in step_times(a.width, a.blocks, a.classes, a.batch, a.device):
            print(json.dumps(line))
        return
    if a.table:
        print(fit_table({sp: rows(a.width, a.blocks, a.classes, a.batch, a.device, sp) for sp in ("head", "all")}))
        return
    for row in rows(a.width, a.blocks, a.classes, a.batch, a.device, a.split):
        print(json.dumps(row))


def step_times(width, blocks, classes, batch, device, repeats=15):
    """Median wall time of one step, plain and donated, alternating (the same load on both),
    for each method that donates, y = the head."""
    import statistics
    import time
    torch.set_num_threads(1)
    net, data, ce = network(width, blocks, classes, batch, device)
    prob = tb.Bilevel(outer=ce, inner=lambda x, y, b: ce(x, y, b) + 1e-3 * sum((w ** 2).sum() for w in y.values()))
    x, y = tb.nn.split(net, inner=[str(len(net) - 1)])
    kw = dict(lr_x=0.01, lr_y=0.05, lr_v=0.05, radius=10.0, eta_x=0.5, eta_y=0.5, eta_v=0.5)
    algos = {"fdehbo": tb.fdehbo(prob, **kw), "fmbo": tb.fmbo(prob, **kw),
             "f2sa": tb.f2sa(prob, lr_x=0.01, lr_y=0.05, lr_z=0.05, inner_steps=1),
             "bome": tb.bome(prob, lr_x=0.01, lr_y=0.05, inner_steps=1)}
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for name, algo in algos.items():
        states = {d: algo.step(algo.init(x, y), data, data) for d in (False, True)}
        times = {False: [], True: []}
        for _ in range(repeats):
            for d in (False, True):
                sync()
                t0 = time.perf_counter()
                states[d] = algo.step(states[d], data, data, donate=d)
                sync()
                times[d].append(time.perf_counter() - t0)
        yield {"method": name, "plain_ms": 1e3 * statistics.median(times[False]),
               "donated_ms": 1e3 * statistics.median(times[True])}


#: the machine of the fit: 8 GPUs of 80 GB (ScaleBiO's 8 x A100-80GB), parameters, state and the step's
#: tensors sharded 1/8 per GPU by FSDP2 (measured per rank: 0.50 at 2 ranks, 0.25 at 4 for FdeHBO)
GPUS, GPU_BYTES = 8, 80e9


def fit_table(by_split) -> str:
    """Markdown: per method, bytes per parameter (module parameters 4 + state + step peak,
    the donated step where the method has one) for y = the head and y = every weight, and the
    largest model N = 8 x 80 GB / (bytes per parameter) with y = every weight (activations and
    the one FSDP2 unit gathered at a time left out)."""
    def best(rows_, method):
        cands = [r for r in rows_ if r["method"] == method]
        return min(cands, key=lambda r: (r["total_bytes_per_param"], not r["donate"]))
    lines = ["| method | state, y = head | step, y = head | total, y = head | total, y = every weight "
             "| largest model on 8 x 80 GB (y = every weight) |", "|---|---|---|---|---|---|"]
    for method in [r["method"] for r in by_split["head"] if not r["donate"]]:
        tot = {sp: 4.0 + best(rs, method)["total_bytes_per_param"] for sp, rs in by_split.items()}
        donated = any(r["donate"] for r in by_split["head"] if r["method"] == method)
        n_max = GPUS * GPU_BYTES / tot["all"] / 1e9
        sharded = "" if method != "fmbo" else " (does not run sharded: exact products)"
        h = best(by_split["head"], method)
        lines.append(f"| {method}{' (donate=True)' if donated else ''} | {h['state_bytes_per_param']:.1f} | "
                     f"{h['step_peak_bytes_per_param']:.1f} | {tot['head']:.0f} | {tot['all']:.0f} | "
                     f"{n_max:.0f} B parameters{sharded} |")
    return "\n".join(lines)


def step_peak(step, device):
    """(bytes the call ``step()`` adds at its peak, how it was measured): CUDA's peak allocated
    bytes above the allocation before the call, or the CPU dispatch tracker."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before,
                "torch.cuda.max_memory_allocated above the allocation before the step")
    return peak_tensor_bytes(step), "bench/peak_memory.py dispatch-mode tracker"


def adam_row(net, data, n, device):
    """The baseline: one plain training step of the same network, ``loss.backward()`` and
    ``torch.optim.Adam`` (state m, v), on the second step (Adam's state exists)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(data[0]), data[1]).backward()
        opt.step()
    step()
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    peak, _ = step_peak(step, device)
    return {"method": "Adam training (loss.backward(), torch.optim.Adam)", "donate": False, "params": n,
            "state_bytes_per_param": state / n, "step_peak_bytes_per_param": peak / n,
            "step_peak_x_param_bytes": peak / (4 * n), "total_bytes_per_param": (state + peak) / n,
            "measured_with": "the same as the methods'"}


def _donates(algo):
    from torchbilevel.optim.donation import DONATING
    return algo.name in DONATING


def _tensors(algo, s):
    try:
        d = algo.state_dict(s)
    except Exception:
        d = s._asdict() if hasattr(s, "_asdict") else {}
    out = []
    for v in d.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out += [t for t in v.values() if isinstance(t, torch.Tensor)]
    return out


if __name__ == "__main__":
    main()
