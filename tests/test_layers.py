"""The library's layers run one way (DESIGN.md, "Layers"): the import graph of torchbilevel/
(imports at any depth, inside functions too) has no cycle and no edge from a lower layer to
a higher one; no library file outgrows one idea; what stays process-wide is per thread, so
two threads running two problems do not mix."""
import ast
import pathlib
import threading

import torch

import torchbilevel as tb

ROOT = pathlib.Path(tb.__file__).parent
KERNELS = ROOT.parent / "kernels"          # installed as torchbilevel.kernels

# rank of each top-level part: a module may import only parts of lower rank, or its own
LAYERS = {
    "tracing": 0, "tree": 0, "kernels": 0,
    "randomness": 1, "buffers": 1, "guards": 1, "ranks": 1, "units": 1,
    "problem": 2, "output_loss": 2,
    "derivatives": 3, "solvers": 3, "features": 3, "distributed": 3, "sharding": 3, "wrappers": 3,
    "nn": 4, "estimators": 4, "health": 4,
    "hypergrad": 5, "tasks": 5,
    "optim": 6,
    "datasets": 7, "text": 7, "__init__": 8, "experiments": 9, "__main__": 10,   # experiments use the public API
}


def _modules():
    for base, prefix in ((ROOT, "torchbilevel"), (KERNELS, "torchbilevel.kernels")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([prefix, *parts]), path, path.name == "__init__.py"


def _graph():
    mods = {name: (path, is_pkg) for name, path, is_pkg in _modules()}
    edges = {name: set() for name in mods}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:        # `from pkg import submodule` imports the submodule
                    sub = f"{origin}.{alias.name}"
                    targets.append(sub if sub in mods else origin)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    edges[name].add(t)
    return edges


def _cycle(edges):
    color, stack = {}, []

    def visit(n):
        color[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in color:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(edges):
        if n not in color:
            found = visit(n)
            if found:
                return found
    return None


def _part(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_import_graph_has_no_cycle():
    edges = _graph()
    assert len(edges) > 30 and edges["torchbilevel.optim.single_loop"]      # the graph was read
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_down_the_layers():
    bad = []
    for a, targets in _graph().items():
        for b in targets:
            pa, pb = _part(a), _part(b)
            if pa == pb or pb == "__init__" and pa == "__init__":
                continue
            ra, rb = LAYERS.get(pa), LAYERS.get(pb)
            assert ra is not None and rb is not None, f"{a} or {b}: add its part to LAYERS"
            if rb > ra:
                bad.append(f"{a} (layer {ra}) imports {b} (layer {rb})")
    assert not bad, "\n".join(bad)


def test_no_library_file_outgrows_one_idea():
    # experiments are programs, not library layers; the rest stays small (issue 17: ~350)
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if "experiments" not in p.parts and (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def _bn_problem(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    net.train()
    gen = torch.Generator().manual_seed(seed)
    X, t = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    x, y = tb.nn.split(net, inner=["3"])

    def inner(x, y, b):
        return ((tb.nn.call(net, x, y, b[0]) - b[1]) ** 2).mean() + 0.1 * sum((w ** 2).sum() for w in y.values())

    def outer(x, y, b):
        return ((tb.nn.call(net, x, y, b[0]) - b[1]) ** 2).mean()
    return net, tb.Bilevel(outer=outer, inner=inner), x, y, (X, t)


def _run(built, steps, barrier=None):
    net, prob, x, y, b = built
    algo = tb.fdehbo(prob, lr_x=0.05, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
    s = algo.init(x, y)
    for _ in range(steps):
        if barrier is not None:
            barrier.wait()          # both threads inside the library at once, step by step
        s = algo.step(s, b, b)
    return s.xf, net[1].running_mean.clone(), s.gy_from_pair


def test_two_threads_running_two_problems_do_not_mix():
    # frozen flags, buffer counts, journals and traces are per thread: each thread's run
    # (with BatchNorm running statistics and their decisions) equals the same run alone.
    # The models are built here, in one thread: their initialisation draws from torch's
    # global generator, which threads share.
    alone = [_run(_bn_problem(seed), 4) for seed in (0, 1)]
    built = [_bn_problem(seed) for seed in (0, 1)]
    barrier, out = threading.Barrier(2), [None, None]

    def work(i):
        out[i] = _run(built[i], 4, barrier)
    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for (xf, rm, pair), (xf2, rm2, pair2) in zip(alone, out):
        assert torch.equal(xf, xf2) and torch.equal(rm, rm2) and pair == pair2 is False
