"""Checks shared by the kernel tests (test_kernels, test_temporal_attention)."""


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each `kernel[grid]` launch, then launches the real one."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def record_launches(monkeypatch, kernels):
    """kernels: (module, kernel name) pairs. Returns the list the names are appended to as they launch."""
    launched = []
    for module, name in kernels:
        monkeypatch.setattr(module, name, _LaunchSpy(getattr(module, name), name, launched))
    return launched
