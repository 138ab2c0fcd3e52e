"Shared by the test files: bit-for-bit equality of nested state (tensors, dicts, lists, Python scalars)."
import torch


def assert_state_equal(a, b, where='state'):
    "Recursive bit-for-bit equality of state dicts (tensors, dicts, lists, Python scalars)."
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a: assert_state_equal(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_state_equal(x, y, f'{where}[{i}]')
    else: assert a == b, f"{where}: {a!r} != {b!r}"
