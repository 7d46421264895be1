"""omni-rt: a compiler-style inference runtime for Qwen3-Omni-30B-A3B."""


def __getattr__(name):
    # Lazy, so `import runtime` stays cheap and `runtime.config` etc. import without the model code.
    if name == "OmniEngine":
        from runtime.engine import OmniEngine

        return OmniEngine
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
