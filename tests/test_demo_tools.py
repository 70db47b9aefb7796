"""glmkit.demo.tools: the demo world's tools, declared exactly as the demo model was trained on them."""

import pytest

from glmkit.agent.tools import ToolRegistry
from glmkit.demo import content
from glmkit.demo.tools import TOOLS, calculate, convert, tool_schema, weather


def test_declarations_are_the_training_data_s():
    assert [t.schema() for t in TOOLS] == [tool_schema(name) for name in content.TASK_TOOLS]


def test_registry_loads_them_by_module_name():
    registry = ToolRegistry.from_file("glmkit.demo.tools")
    assert [t.name for t in registry] == ["get_weather", "calculator", "convert_units"]
    outcome = registry.call("calculator", {"expression": "-355 - 42"})
    assert outcome.ok and outcome.value == {"result": -397}
    bad = registry.call("convert_units", {"value": 3, "from_unit": "km", "to_unit": "kg"})
    assert not bad.ok and "cannot convert 'km' to 'kg'" in bad.observation
    with pytest.raises(ValueError, match="no module"):
        ToolRegistry.from_file("glmkit.demo.no_such_tools")


@pytest.mark.parametrize("expression, result", [("3 * (4 + 5)", 27), ("7 / 2", 3.5), ("-2 - -3", 1),
                                                ("1 / 3", 0.33), ("2.5 * 4", 10)])
def test_calculator(expression, result):
    assert calculate(expression) == {"result": result}


@pytest.mark.parametrize("expression, message", [("__import__('os')", "only numbers"), ("2 ** 10", "only numbers"),
                                                 ("1 / 0", "division by zero"), ("3 +", "not an arithmetic"),
                                                 ("9" * 300, "characters"), ("99999999 * 99999999 * 999", "above")])
def test_calculator_refuses_what_is_not_arithmetic(expression, message):
    with pytest.raises(ValueError, match=message):
        calculate(expression)


def test_unit_conversion_both_ways():
    assert convert(10, "km", "mi") == {"value": 6.21, "unit": "mi"}
    assert convert(1, "in", "cm") == {"value": 2.54, "unit": "cm"}
    assert convert(100, "celsius", "fahrenheit") == {"value": 212, "unit": "fahrenheit"}
    assert convert(212, "fahrenheit", "celsius") == {"value": 100, "unit": "celsius"}


def test_weather_is_made_up_but_fixed_per_city():
    london = weather("London")
    assert london == weather("London") and london["city"] == "London"
    assert -15 <= london["temperature"] <= 40 and 10 <= london["humidity"] <= 95
    assert london["condition"] in [en for en, _ in content.CONDITIONS]
    assert weather("北京")["condition"] in [zh for _, zh in content.CONDITIONS]
    with pytest.raises(ValueError, match="empty"):
        weather(" ")
