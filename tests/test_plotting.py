"""The demo's plot (issue 26, item 5): a log-time axis keeps runs that finish early (the
baselines, done in half a second) visible, and a zoom row under each metric separates the
methods that end close together. Checked on the figure matplotlib is about to save."""
import math

import pytest

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402

from torchbilevel.experiments import plotting  # noqa: E402


def test_zoom_window_is_the_tightest_cluster_of_final_values_padded():
    curves = {  # final values 0.50, 0.51, 0.53, 0.90; "early" ends before a quarter of x_max
        "a": ((1.0, 4.0, 10.0), (2.0, 1.0, 0.50)),
        "b": ((1.0, 5.0, 9.0), (2.0, 1.0, 0.51)),
        "c": ((1.0, 6.0, 8.0), (2.0, 1.0, 0.53)),
        "d": ((1.0, 6.0, 10.0), (2.0, 1.0, 0.90)),
        "early": ((0.1, 0.5), (2.0, 0.505)),
    }
    (x0, x1), (y0, y1) = plotting.zoom_window(curves)
    assert (x0, x1) == (10.0 / 4, 10.0 * 1.05)
    # 4 methods reach the window, half of them is 2: the tightest pair is (0.50, 0.51)
    assert math.isclose(y0, 0.50 - 0.3 * 0.01) and math.isclose(y1, 0.51 + 0.3 * 0.01)
    assert plotting.zoom_window({"a": curves["a"]}) is None
    # equal finals: the window keeps a width of 1e-3 of the value on each side
    (_, _), (y0, y1) = plotting.zoom_window({"a": ((1.0, 2.0), (1.0, 0.4)), "b": ((1.0, 2.0), (1.0, 0.4))})
    assert math.isclose(y0, 0.4 - 4e-4) and math.isclose(y1, 0.4 + 4e-4)


def test_log_time_axis_and_zoom_row_on_the_saved_figure(tmp_path, monkeypatch):
    record = [{"method": m, "seconds": t, "loss": 1.0 / (1.0 + t) + off}
              for m, off, times in (("slow", 0.0, (0.0, 1.0, 5.0, 10.0)), ("close", 0.002, (0.0, 2.0, 6.0, 10.0)),
                                    ("baseline", 0.3, (0.0, 0.2, 0.5)))
              for t in times]
    seen = {}
    original = plt.Figure.savefig

    def spy(fig, path, **kw):
        seen["axes"] = [(ax.get_xscale(), ax.get_xlabel(), ax.get_xlim(), ax.get_ylim(),
                         [(ln.get_label(), list(ln.get_xdata())) for ln in ax.get_lines()]) for ax in fig.axes]
        return original(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    out = plotting.plot_curves(record, str(tmp_path / "p.png"), "loss", xlabel="time (s)", logx=True, zoom=True)
    assert (tmp_path / "p.png").stat().st_size > 0 and out.endswith("p.png")
    (top_scale, top_label, _, _, top_lines), (zoom_scale, _, zoom_x, zoom_y, zoom_lines) = seen["axes"]
    assert top_scale == "log" and zoom_scale == "log" and "log scale" in top_label
    # the baseline (finished at 0.5 s of 10) is drawn, and the 0 s records at 10/1000 s
    lines = dict(top_lines)
    assert lines["baseline"] == [0.01, 0.2, 0.5] and lines["slow"][0] == 0.01
    # the zoom panel is zoom_window of the same curves: the two methods that end 0.002 apart
    want_x, want_y = plotting.zoom_window({"slow": ((0.01, 1.0, 5.0, 10.0), (0, 0, 0, 1 / 11)),
                                           "close": ((0.01, 2.0, 6.0, 10.0), (0, 0, 0, 1 / 11 + 0.002))})
    assert zoom_x == pytest.approx(want_x) and zoom_y == pytest.approx(want_y)
    assert zoom_y[1] - zoom_y[0] < 0.01 and len(zoom_lines) == 3


def test_without_the_new_keywords_the_plot_is_as_before(tmp_path, monkeypatch):
    record = [{"method": "m", "seconds": float(t), "loss": 1.0 / (1 + t)} for t in range(4)]
    seen = {}
    original = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig",
                        lambda fig, path, **kw: (seen.setdefault("n", len(fig.axes)),
                                                 seen.setdefault("scale", fig.axes[0].get_xscale()),
                                                 original(fig, path, **kw))[-1])
    plotting.plot_curves(record, str(tmp_path / "q.png"), "loss")
    assert seen == {"n": 1, "scale": "linear"}
