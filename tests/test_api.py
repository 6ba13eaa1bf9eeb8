"""``import ddpmseg`` exposes the functions the CLI commands are thin over."""

import importlib

import ddpmseg


def test_top_level_functions_are_the_library_functions():
    assert ddpmseg.extract is importlib.import_module("ddpmseg.pipelines.extract").extract
    assert ddpmseg.fit is importlib.import_module("ddpmseg.classifier").fit
    assert ddpmseg.load_config is importlib.import_module("ddpmseg.interop.reference_config").load_config
    assert ddpmseg.predict is importlib.import_module("ddpmseg.pipelines.predict").predict
    assert ddpmseg.evaluate is importlib.import_module("ddpmseg.outputs.evaluate").evaluate
    assert ddpmseg.demo is importlib.import_module("ddpmseg.pipelines.demo").demo
    assert ddpmseg.report is importlib.import_module("ddpmseg.outputs.report").report
    assert all(callable(getattr(ddpmseg, name)) for name in ddpmseg.__all__ if name != "__version__")
