# Single-process references for the attention parity tests.
import torch


def frame_ids(text_len: int, num_frames: int, tpf: int) -> torch.Tensor:
    """-1 for text tokens, else the frame index of each token of the full sequence."""
    return torch.cat([torch.full((text_len,), -1), torch.arange(num_frames).repeat_interleave(tpf)])


def reference_attention(q, k, v, text_len, num_frames, tpf, causal, scale=None):
    """Dense softmax attention over the full sequence in float64, with the frame-causal rule: frame queries see
    the text and frames <= their own; text queries see only the text."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        fid = frame_ids(text_len, num_frames, tpf)
        qf, kf = fid[:, None], fid[None, :]
        allowed = (kf == -1) | ((qf >= 0) & (kf <= qf))
        s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v.double()).to(q.dtype)
