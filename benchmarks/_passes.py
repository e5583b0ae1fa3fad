"""What a pass asks of the driver, answered for benchmarks that call passes directly with fixed params."""


class Ctx:
    """What a pass asks of the driver, for calling it directly with fixed params."""

    def __init__(self, params):
        self.params = params

    def per_layer(self, key, depth):
        value = self.params[key]
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * depth

    def images(self, name):
        raise LookupError(f"no data {name!r}: this benchmark gives the passes none")

    def report(self, key, value):
        print(f"pass reports {key} = {value}")

    def warn(self, message):
        print(f"pass warns: {message}")

    def error(self, key, message):
        return ValueError(f"{key}: {message}")
