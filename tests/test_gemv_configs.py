"""GEMV tile configs tuned inside the decode step: the file format, the lookup order, and the tuner's search."""
import json
import sys
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.kernels import gemv
from lmforge.infer.kernels.options import KernelOptions
from lmforge.infer.kernels.paged_attention import kernel_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tune_decode_gemv as tuner  # noqa: E402


def test_config_kind_names_shape_and_fusions():
    assert gemv.config_kind(3072, 2048, norm=True) == "3072x2048+norm"
    assert gemv.config_kind(2048, 8192, silu_mul=True, residual=True) == "2048x8192+silu+residual"
    assert gemv.config_kind(128256, 2048) == "128256x2048"
    assert tuner.fits("2048x8192+silu", (8, 8192, 8, 1, 2)) and not tuner.fits("2048x8192+silu", (8, 2048, 8, 1, 2))
    assert tuner.fits("2048x8192+silu", (8, 2048, 8, 1)) and not tuner.fits("3072x2048+norm", (2, 4096, 8, 1, 2))


def test_config_file_loads_and_rejects_bad_entries(tmp_path, monkeypatch):
    good = tmp_path / "ok.json"
    good.write_text(json.dumps({"device": "X", "configs": {"2048x8192+silu+residual": [8, 1024, 8, 3]}}))
    assert gemv.load_configs(good) == {"2048x8192+silu+residual": (8, 1024, 8, 3)}
    assert gemv.load_configs(tmp_path / "missing.json") == {}
    assert gemv.config_file("NVIDIA H100 80GB HBM3", KernelOptions(gemv_configs=str(good)).gemv_configs) == good
    assert gemv.config_file("NVIDIA H100 80GB HBM3", KernelOptions().gemv_configs).name == "NVIDIA_H100_80GB_HBM3.json"
    for bad in ({"configs": {"8x8": [3, 1024, 8, 3]}}, {"configs": {"8x8": [8, 1024, 8]}}, {"cfg": {}}, [1, 2]):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="not a GEMV config file"):
            gemv.load_configs(path)


def test_shipped_config_files_are_valid():
    files = sorted(gemv.CONFIG_DIR.glob("*.json"))
    for path in files:
        configs = gemv.load_configs(path)
        assert configs and all(tuner.fits(kind, cfg) for kind, cfg in configs.items())


@pytest.mark.skipif(not (torch.cuda.is_available() or kernel_available(torch.device("cpu"))),
                    reason="needs CUDA or triton's CPU interpreter")
def test_override_reaches_the_kernel_launch(monkeypatch):
    """A config override for a kind is what the kernel is launched with (on CPU under the interpreter), and the
    product is still x W^T."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = gemv._kernel().gemv_kernel
    launches = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["BLOCK_N"], kwargs["BLOCK_K"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gemv._kernel(), "gemv_kernel", Spy())
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(n, 96, generator=g).bfloat16().to(device) for n in (1, 40))
    monkeypatch.setitem(gemv.config_overrides, gemv.config_kind(40, 96), (8, 32, 4, 1))
    y = gemv.gemv(x, w)
    assert launches == [((5,), 8, 32)]
    torch.testing.assert_close(y.float(), (x.float() @ w.float().T), atol=0.05, rtol=0.02)
    if device == "cpu":
        gemv.gemv(x, w[:24])  # another kind: the interpreter's fixed config
        assert launches[-1] == ((6,), 4, 64)


def test_coordinate_descent_picks_each_kinds_fastest_and_ignores_noise():
    """A synthetic step whose time is the sum of per-kind costs: the search finds each kind's cheapest config,
    skips K tiles wider than K, and keeps no change whose gain is below min_gain."""
    cands = [(2, 512, 4, 1), (8, 1024, 8, 3), (4, 2048, 4, 1), (2, 4096, 8, 1)]
    cost = {"a": {None: 10.0, (8, 1024, 8, 3): 7.0, (4, 2048, 4, 1): 8.0},
            "b": {None: 20.0, (2, 512, 4, 1): 19.99, (4, 2048, 4, 1): 15.0}}
    kinds = ["100x2048+norm", "100x8192"]
    names = dict(zip(kinds, "ab"))
    seen = []

    def measure(configs):
        seen.append(dict(configs))
        return sum(cost[names[k]].get(configs.get(k), cost[names[k]][None] + 1) for k in kinds)

    best, us, trials = tuner.coordinate_descent(kinds, cands, measure, min_gain=0.003, log=lambda row: None)
    assert best == {"100x2048+norm": (8, 1024, 8, 3), "100x8192": (4, 2048, 4, 1)}
    assert us == 22.0 and trials[0]["us"] == 30.0
    assert not any(c.get("100x2048+norm") == (2, 4096, 8, 1) for c in seen)  # 4096-wide tiles over K = 2048
    assert any(c.get("100x8192") == (2, 4096, 8, 1) for c in seen)
    assert len(trials) == 1 + 3 + 4
    best, us, _ = tuner.coordinate_descent(kinds, [(2, 512, 4, 1)], measure, min_gain=0.003, log=lambda row: None)
    assert best == {} and us == 30.0  # 20 → 19.99 is within the noise margin: kept autotuned
    best, _, _ = tuner.coordinate_descent(kinds, [(2, 512, 4, 1)], measure, min_gain=0.0, log=lambda row: None)
    assert best == {"100x8192": (2, 512, 4, 1)}
    best, us, _ = tuner.coordinate_descent(kinds, [(2, 512, 4, 1)], measure, log=lambda row: None,
                                           start={"100x2048+norm": [8, 1024, 8, 3], "other": [2, 512, 4, 1]})
    assert best == {"100x2048+norm": (8, 1024, 8, 3)} and us == 27.0  # refines a file: kinds not in the step dropped


@pytest.mark.skipif(not (torch.cuda.is_available() or kernel_available(torch.device("cpu"))),
                    reason="needs CUDA or triton's CPU interpreter")
@pytest.mark.parametrize("fusion", ["plain", "norm", "silu_residual"])
def test_row_walking_kernel_equals_one_program_per_block(fusion, monkeypatch):
    """A five-field config (programs per SM) runs the kernel whose programs walk row blocks (here 8 programs over
    38 rows in blocks of 4: two passes for some, one for others, the last block partial): same output as the
    one-program-per-block kernel, with each fusion."""
    from lmforge.models.transformer import RMSNorm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(gemv, "_sm_count", lambda device: 4)
    g = torch.Generator().manual_seed(5)
    N, K = 38, 96
    bf16 = dict(device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(**bf16)
    res = torch.randn(1, N, generator=g).to(**bf16)
    norm = RMSNorm(K, 1e-5).to(**bf16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(K, generator=g))
    x = torch.randn(1, 2 * K if fusion == "silu_residual" else K, generator=g).to(**bf16)

    def run():
        if fusion == "norm":
            return gemv.gemv_rmsnorm(x, norm.weight, norm.eps, 0.0, w)
        if fusion == "silu_residual":
            return gemv.gemv_silu_mul(x, w, None, res)
        return gemv.gemv(x, w)

    kind = gemv.config_kind(N, K, silu_mul=fusion == "silu_residual", norm=fusion == "norm",
                            residual=fusion == "silu_residual")
    monkeypatch.setitem(gemv.config_overrides, kind, (4, 128, 4, 1))
    want = run()
    monkeypatch.setitem(gemv.config_overrides, kind, (4, 128, 4, 1, 2))
    launches = []
    walker = gemv._kernel().gemv_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return walker[grid]

    monkeypatch.setattr(gemv._kernel(), "gemv_rows_kernel", Spy())
    got = run()
    assert launches == [(8,)]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
