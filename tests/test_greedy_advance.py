"""The greedy step's end in one launch (`lmforge.infer.kernels.greedy_advance`) = argmax + the PyTorch bookkeeping."""
import pytest
import torch

from lmforge.infer.kernels import greedy_advance as ga
from lmforge.infer.kernels.options import KernelOptions
from lmforge.infer.kernels.paged_attention import kernel_available

runs_kernel = torch.cuda.is_available() or kernel_available(torch.device("cpu"))


@pytest.mark.skipif(not runs_kernel, reason="needs CUDA or triton's CPU interpreter")
@pytest.mark.parametrize("dtype,B", [(torch.bfloat16, 4), (torch.float32, 4), (torch.bfloat16, 1)])
def test_kernel_equals_argmax_and_bookkeeping(dtype, B, monkeypatch):
    """Rows over several vocabulary slices: a maximum tied across two slices (the first wins), one inside a
    slice's tail, a NaN (wins, as in argmax), the last entry; twice in a row, so the arrival counters must be zero
    again and the step counter advance once per launch; `sampled` is a column slice of a wider buffer. One row
    (batch-1 decode) advances the step without counting the rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    V, width = 2 * ga.SLICE + 357, 6
    buffers = {"sampled": torch.full((8, width), -1), "step": torch.tensor([2]),
               "tokens": torch.zeros(width, dtype=torch.long), "starts": torch.arange(width) * 10}
    got = {k: v.to(device) for k, v in buffers.items()}
    want = {k: v.clone().to(device) for k, v in buffers.items()}
    for launch in range(2):
        logits = torch.randn(4, V, generator=g)
        logits[0, [ga.SLICE + 5, 2 * ga.SLICE + 7]] = 50.0  # tie across slices → the first
        logits[1, 2 * ga.SLICE + 350] = 50.0  # in the last, partial slice
        logits[2, 17] = float("nan")
        logits[3, V - 1] = 50.0
        logits = logits[:B].to(device, dtype)
        for bufs, use_kernel in ((got, True), (want, False)):
            if use_kernel or device == "cpu":
                ga.greedy_advance(logits, bufs["sampled"][:, :B], bufs["step"], bufs["tokens"][:B],
                                  bufs["starts"][:B], KernelOptions(cpu_interpreter=use_kernel))
            else:  # the PyTorch path on CUDA: the ops themselves
                t = logits.float().nan_to_num(float("inf")).argmax(-1)
                bufs["sampled"][:, :B].index_copy_(0, bufs["step"], t[None])
                bufs["step"].add_(1)
                bufs["tokens"][:B].copy_(t)
                bufs["starts"][:B].add_(1)
        assert got["tokens"][:B].tolist() == [ga.SLICE + 5, 2 * ga.SLICE + 350, 17, V - 1][:B]
        for name in buffers:
            assert torch.equal(got[name], want[name]), name
        assert int(got["step"]) == 3 + launch
        assert int(ga._COUNTERS[logits.device].abs().sum()) == 0
    assert got["sampled"][:, B:].eq(-1).all() and got["sampled"][[0, 1, 4, 5, 6, 7]].eq(-1).all()
