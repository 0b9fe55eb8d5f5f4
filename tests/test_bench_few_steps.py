"""bench.few_steps' report without ComfyUI: where DPCache beats sampling fewer steps at equal full evaluations."""
from types import SimpleNamespace

from bench import few_steps as fs


def row(method, k, psnr, full=None, keys=None):
    return dict(method=method, k=k, full=float(k if full is None else full), psnr=psnr, keys=keys)


ROWS = [
    row("plain", 8, [float("inf")] * 2),
    row(fs.FEWER, 3, [30.0, 28.0]), row(fs.AUTO, 3, [41.0, 35.0], full=5, keys="[0, 1, 2, 4, 6]"),
    dict(method=fs.CAL3, k=3, full=None, psnr=None, keys=None),
    row(fs.FEWER, 5, [36.0, 30.0]), row(fs.CAL3, 5, [42.0, 36.0], keys="[0, 1, 2, 4, 6]"),
    row(fs.PRIOR, 5, [40.0, 34.0], keys="[0, 1, 2, 4, 6]"),
]


def test_pays_compares_at_the_k_each_run_made():
    text = fs.pays(ROWS, [3, 5])
    # at K=3 the automatic mode made 5 full evaluations: it is not counted as a K=3 run
    assert "K=3: only fewer steps (29.0 dB)" in text
    assert "K=5: DPCache (DPCache calibrated (first 3) 39.0 dB vs fewer steps 33.0 dB)" in text
    worse = [dict(r, psnr=[p - 6 for p in r["psnr"]]) if r["method"] in (fs.CAL3, fs.PRIOR) and r["psnr"] else r for r in ROWS]
    assert "K=5: fewer steps (DPCache calibrated (first 3) 33.0 dB vs fewer steps 33.0 dB)" in fs.pays(worse, [3, 5])  # a tie: K steps cost less


def test_report_table():
    args = SimpleNamespace(prompts=2, calib=1)
    text = fs.report({8: ROWS}, args, "test machine", 1.0)
    assert "| fewer steps | 29.0 (28.0) | 33.0 (30.0) |" in text
    assert "| DPCache calibrated (first 3) | no plan | 39.0 (36.0) |" in text
    assert "| DPCache automatic mode | 38.0 (35.0) [K=5] | no plan |" in text
    assert "K=3 DPCache automatic mode: [0, 1, 2, 4, 6]" in text
