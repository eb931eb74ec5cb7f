"""Random catalogues of distinct semantic-ID tuples, shared by the decoder and kernel tests."""

import torch


def random_catalogue(num_items: int, sizes: list[int], seed: int | torch.Generator) -> torch.Tensor:
    """[num_items, len(sizes)] distinct code tuples (rejection sampling: tiny catalogues only)."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    seen, rows = set(), []
    while len(rows) < num_items:
        row = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in sizes)
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return torch.tensor(rows)
