# Every seed cpdit derives from a user's seed goes through `derive_seed`: one mixing rule, so two streams can only
# share values by naming the same keys. A digest, not arithmetic on the keys: sums and products of names or counters
# collide (a seed from `len(name)` and `sum(map(ord, name))` gave 142 of 168 LoRA matrices of a CogVideoX-5B an
# equal twin, `blocks.0...to_q` and `blocks.6...to_k` among them).
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """The seed of the random stream named by `keys` under the user's `seed`: 63 bits of a BLAKE2b digest of both,
    so it fits `torch.Generator.manual_seed` and `torch.manual_seed`."""
    text = "\x1f".join(str(k) for k in (seed, *keys))  # unit separator: ("a", "b") and ("a\x1fb",) are not keys
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator for the stream `keys` under `seed` (draws are made on the CPU and moved: the same values on
    every device type)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def param_generator(seed: int, name: str) -> torch.Generator:
    """The generator of parameter `name`'s initial value: models initialise each parameter from its own name, so a
    value does not depend on the order parameters are built or on which rank materialises them."""
    return generator(seed, "param", name)
