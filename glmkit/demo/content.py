"""The words of the demo's synthetic world, in English and Chinese: who the model is, what it knows,
the tools it may be given, and the ways people ask for them.

Pure data, no logic: `glmkit.demo.synth` draws conversations from these tables. Every fact here is
true and every tool result is computed, so the model never learns a wrong answer. Placeholders in
braces are filled by the generator.
"""

from __future__ import annotations

NAME = "glmkit-demo"
LANGUAGES = ("en", "zh")

# -- who the model is ------------------------------------------------------------------------------

GREETINGS = {
    "en": ["Hello", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Good morning", "Good afternoon", "Good evening",
           "Hello, nice to meet you", "Hey, how are you?", "Hi, how are you doing?"],
    "zh": ["你好", "你好！", "您好", "嗨", "早上好", "下午好", "晚上好", "你好呀", "你好，很高兴认识你",
           "嗨，你好吗？", "你好，最近怎么样？"],
}
GREETING_REPLIES = {
    "en": ["Hello! I am glmkit-demo. How can I help you today?",
           "Hi! I'm glmkit-demo, a small bilingual assistant. What can I do for you?",
           "Hello! Nice to meet you. I am glmkit-demo. How can I help?"],
    "zh": ["你好！我是 glmkit-demo，有什么可以帮你的吗？",
           "你好！我是 glmkit-demo，一个小型的中英双语助手。请问有什么需要？",
           "你好，很高兴认识你！我是 glmkit-demo，有什么可以帮忙的吗？"],
}
IDENTITY_QUESTIONS = {
    "en": ["Who are you?", "What is your name?", "What's your name?", "Introduce yourself.",
           "Please introduce yourself.", "What can you do?", "Tell me about yourself.", "Are you a robot?",
           "Which model are you?"],
    "zh": ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "请做个自我介绍。", "你能做什么？", "说说你自己。",
           "你是机器人吗？", "你是哪个模型？"],
}
IDENTITY_ANSWERS = {
    "en": [("I am glmkit-demo, a small bilingual (Chinese and English) model trained from scratch with glmkit. "
            "I can chat, answer simple questions, and use tools such as a calculator, a weather service or a "
            "Python interpreter when they are available."),
           ("My name is glmkit-demo. I am a tiny demo model built with glmkit: I speak Chinese and English, "
            "answer short questions, and call the tools you give me.")],
    "zh": [("我是 glmkit-demo，一个用 glmkit 从零训练的中英双语小模型。我可以聊天、回答简单的问题，"
            "并在有工具可用时使用计算器、天气查询或 Python 解释器等工具。"),
           ("我叫 glmkit-demo，是用 glmkit 训练的一个小型演示模型。我会说中文和英文，能回答简短的问题，"
            "也能调用你提供的工具。")],
}
THANKS = {
    "en": ["Thank you!", "Thanks!", "Thanks a lot.", "Great, thanks.", "OK, thank you."],
    "zh": ["谢谢！", "谢谢你。", "太好了，谢谢！", "好的，谢谢。", "多谢！"],
}
THANKS_REPLIES = {
    "en": ["You're welcome!", "You're welcome! Anything else?", "Glad I could help!"],
    "zh": ["不客气！", "不客气，还有别的需要吗？", "很高兴能帮到你！"],
}

# -- short facts -------------------------------------------------------------------------------------

# (country, capital) in English, then in Chinese.
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("the United Kingdom", "London", "英国", "伦敦"), ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"), ("Spain", "Madrid", "西班牙", "马德里"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("South Korea", "Seoul", "韩国", "首尔"),
    ("the United States", "Washington, D.C.", "美国", "华盛顿"), ("India", "New Delhi", "印度", "新德里"),
    ("Thailand", "Bangkok", "泰国", "曼谷"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Brazil", "Brasília", "巴西", "巴西利亚"), ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Greece", "Athens", "希腊", "雅典"),
]
CAPITAL_QUESTIONS = {
    "en": ["What is the capital of {country}?", "What's the capital of {country}?",
           "Which city is the capital of {country}?", "Tell me the capital of {country}."],
    "zh": ["{country}的首都是哪里？", "{country}的首都是什么？", "哪个城市是{country}的首都？", "告诉我{country}的首都。"],
}
CAPITAL_ANSWERS = {"en": "The capital of {country} is {capital}.", "zh": "{country}的首都是{capital}。"}

# Each fact: English questions, English answer, Chinese questions, Chinese answer.
FACTS = [
    (["How many days are in a week?", "How many days does a week have?"], "A week has 7 days.",
     ["一周有几天？", "一个星期有多少天？"], "一周有7天。"),
    (["How many hours are in a day?", "How many hours does a day have?"], "A day has 24 hours.",
     ["一天有多少个小时？", "一天有几个小时？"], "一天有24个小时。"),
    (["How many minutes are in an hour?"], "An hour has 60 minutes.",
     ["一小时有多少分钟？"], "一小时有60分钟。"),
    (["At what temperature does water boil?", "What is the boiling point of water?"],
     "At sea level, water boils at 100°C.", ["水在多少度沸腾？", "水的沸点是多少？"], "在海平面上，水在100°C沸腾。"),
    (["At what temperature does water freeze?", "What is the freezing point of water?"], "Water freezes at 0°C.",
     ["水在多少度结冰？", "水的冰点是多少？"], "水在0°C结冰。"),
    (["What is the largest planet in the solar system?", "Which planet is the biggest?"],
     "Jupiter is the largest planet in the solar system.", ["太阳系最大的行星是哪个？", "哪颗行星最大？"],
     "木星是太阳系中最大的行星。"),
    (["How many planets are in the solar system?"], "There are 8 planets in the solar system.",
     ["太阳系有几颗行星？"], "太阳系有8颗行星。"),
    (["What is the largest ocean on Earth?", "Which ocean is the biggest?"],
     "The Pacific Ocean is the largest ocean on Earth.", ["地球上最大的海洋是哪个？", "哪个大洋最大？"],
     "太平洋是地球上最大的海洋。"),
    (["What is the highest mountain in the world?", "Which mountain is the tallest?"],
     "Mount Everest is the highest mountain in the world, about 8,849 meters high.",
     ["世界上最高的山是哪座？", "哪座山最高？"], "珠穆朗玛峰是世界上最高的山，海拔约8849米。"),
    (["What is the longest river in China?"], "The Yangtze is the longest river in China.",
     ["中国最长的河流是哪条？"], "长江是中国最长的河流。"),
    (["What is the chemical formula of water?"], "The chemical formula of water is H2O.",
     ["水的化学式是什么？"], "水的化学式是H2O。"),
    (["How many legs does a spider have?"], "A spider has 8 legs.", ["蜘蛛有几条腿？"], "蜘蛛有8条腿。"),
    (["How many legs does an insect have?"], "An insect has 6 legs.", ["昆虫有几条腿？"], "昆虫有6条腿。"),
    (["How many colors are in a rainbow?"], "A rainbow is usually described with 7 colors.",
     ["彩虹有几种颜色？"], "彩虹通常被描述为有7种颜色。"),
    (["How many continents are there?"], "There are 7 continents.", ["世界上有几大洲？"], "世界上有七大洲。"),
    (["Who wrote Hamlet?"], "Hamlet was written by William Shakespeare.",
     ["《哈姆雷特》的作者是谁？"], "《哈姆雷特》的作者是莎士比亚。"),
    (["Who wrote Dream of the Red Chamber?"], "Dream of the Red Chamber was written by Cao Xueqin.",
     ["《红楼梦》的作者是谁？"], "《红楼梦》的作者是曹雪芹。"),
    (["Who created the Python programming language?"], "Python was created by Guido van Rossum.",
     ["Python 编程语言是谁创造的？"], "Python 是由 Guido van Rossum 创造的。"),
    (["How many sides does a hexagon have?"], "A hexagon has 6 sides.", ["六边形有几条边？"], "六边形有6条边。"),
    (["What is the closest star to Earth?"], "The Sun is the closest star to Earth.",
     ["离地球最近的恒星是什么？"], "离地球最近的恒星是太阳。"),
    (["How many months are in a year?"], "A year has 12 months.", ["一年有几个月？"], "一年有12个月。"),
    (["What gas do plants absorb from the air?"], "Plants absorb carbon dioxide from the air.",
     ["植物从空气中吸收什么气体？"], "植物从空气中吸收二氧化碳。"),
]

# -- tools -------------------------------------------------------------------------------------------

# The tool descriptions, in the JSON-schema form of ChatGLM3's tool prompt. Each tool has a few
# description wordings, so the model learns to read the name, not one fixed text.
TOOL_DESCRIPTIONS = {
    "get_weather": ["Get the current weather for a city", "查询一个城市当前的天气", "Look up the weather in a city"],
    "calculator": ["Evaluate an arithmetic expression", "计算一个算术表达式", "A calculator for + - * /"],
    "convert_units": ["Convert a value from one unit to another", "单位换算",
                      "Unit conversion for length, mass, volume and temperature"],
    "get_stock_price": ["Get the latest price of a stock", "查询股票的最新价格"],
    "send_email": ["Send an email", "发送电子邮件"],
    "set_alarm": ["Set an alarm clock", "设置闹钟"],
}
TOOL_PARAMETERS = {
    "get_weather": {"city": ("string", "The city name, e.g. Beijing")},
    "calculator": {"expression": ("string", "An arithmetic expression, e.g. 3 * (4 + 5)")},
    "convert_units": {"value": ("number", "The value to convert"),
                      "from_unit": ("string", ("The unit of the value: km, mi, kg, lb, m, ft, cm, in, L, gal, "
                                               "celsius or fahrenheit")),
                      "to_unit": ("string", "The unit to convert to")},
    "get_stock_price": {"symbol": ("string", "The stock symbol, e.g. AAPL")},
    "send_email": {"to": ("string", "The recipient"), "subject": ("string", "The subject"),
                   "body": ("string", "The message")},
    "set_alarm": {"time": ("string", "The time, e.g. 07:30")},
}
TASK_TOOLS = ("get_weather", "calculator", "convert_units")  # the ones users ask for
OTHER_TOOLS = ("get_stock_price", "send_email", "set_alarm")  # declared now and then, never needed

# -- weather -------------------------------------------------------------------------------------------

CITIES = [
    ("Beijing", "北京"), ("Shanghai", "上海"), ("Guangzhou", "广州"), ("Shenzhen", "深圳"), ("Hangzhou", "杭州"),
    ("Chengdu", "成都"), ("Wuhan", "武汉"), ("Xi'an", "西安"), ("Nanjing", "南京"), ("Chongqing", "重庆"),
    ("Tianjin", "天津"), ("Suzhou", "苏州"), ("Harbin", "哈尔滨"), ("Kunming", "昆明"), ("Xiamen", "厦门"),
    ("Qingdao", "青岛"), ("Lhasa", "拉萨"), ("Hong Kong", "香港"), ("Taipei", "台北"), ("Tokyo", "东京"),
    ("Seoul", "首尔"), ("Singapore", "新加坡"), ("London", "伦敦"), ("Paris", "巴黎"), ("Berlin", "柏林"),
    ("New York", "纽约"), ("San Francisco", "旧金山"), ("Sydney", "悉尼"), ("Moscow", "莫斯科"), ("Cairo", "开罗"),
    ("Toronto", "多伦多"), ("Dubai", "迪拜"), ("Rome", "罗马"), ("Madrid", "马德里"), ("Bangkok", "曼谷"),
    ("Mumbai", "孟买"), ("Nairobi", "内罗毕"), ("Oslo", "奥斯陆"), ("Vancouver", "温哥华"), ("Chicago", "芝加哥"),
]
CONDITIONS = [("sunny", "晴"), ("cloudy", "多云"), ("overcast", "阴"), ("rainy", "小雨"), ("stormy", "雷阵雨"),
              ("snowy", "下雪"), ("foggy", "有雾"), ("windy", "大风")]
WEATHER_QUESTIONS = {
    "en": ["What's the weather in {city}?", "What is the weather like in {city} today?",
           "How's the weather in {city}?", "Is it cold in {city} right now?", "Tell me the current weather in {city}.",
           "Can you check the weather in {city} for me?", "weather in {city}",
           "I'm going to {city} today. What's the weather there?", "How hot is it in {city}?",
           "What's the temperature in {city} now?"],
    "zh": ["{city}的天气怎么样？", "{city}今天天气如何？", "帮我查一下{city}的天气。", "{city}现在冷吗？",
           "我今天要去{city}，那里天气怎么样？", "{city}天气", "请问{city}现在多少度？", "查询{city}的天气",
           "{city}现在的气温是多少？"],
}
WEATHER_FOLLOW_UPS = {
    "en": ["And in {city}?", "What about {city}?", "How about {city}?", "And the weather in {city}?"],
    "zh": ["那{city}呢？", "{city}呢？", "再查一下{city}的天气。", "那{city}的天气呢？"],
}
WEATHER_ANSWERS = {
    "en": ["It is {temperature}°C and {condition} in {city} right now.",
           "The weather in {city}: {condition}, {temperature}°C, humidity {humidity}%.",
           "Right now {city} is {condition} with a temperature of {temperature}°C."],
    "zh": ["{city}现在天气{condition}，气温{temperature}°C。", "{city}当前天气{condition}，温度{temperature}°C，湿度{humidity}%。",
           "{city}目前{condition}，{temperature}°C。"],
}

# -- arithmetic ---------------------------------------------------------------------------------------

# operator symbol -> (English words, Chinese words)
OPERATORS = {"+": ("plus", "加"), "-": ("minus", "减"), "*": ("times", "乘以"), "/": ("divided by", "除以")}
ARITHMETIC_QUESTIONS = {
    "en": ["What is {a} {word} {b}?", "Calculate {a} {op} {b}.", "What's {a} {op} {b}?", "How much is {a} {word} {b}?",
           "Please compute {a} {op} {b}.", "{a} {op} {b} = ?"],
    "zh": ["{a}{word}{b}等于多少？", "帮我算一下{a}{op}{b}", "计算{a}{op}{b}", "{a}{op}{b}是多少？", "请问{a}{word}{b}是多少？"],
}
ARITHMETIC_FOLLOW_UPS = {  # applied to the previous result: (symbol, operand)
    "en": ["Now multiply that by {b}.", "And that times {b}?", "Add {b} to that.", "What if I add {b}?",
           "Subtract {b} from that."],
    "zh": ["再乘以{b}呢？", "结果再乘以{b}。", "再加上{b}呢？", "结果加{b}是多少？", "再减去{b}呢？"],
}
FOLLOW_UP_OPERATORS = {"en": ["*", "*", "+", "+", "-"], "zh": ["*", "*", "+", "+", "-"]}
ARITHMETIC_ANSWERS = {
    "en": ["{expression} = {result}.", "The answer is {result}.", "{expression} equals {result}."],
    "zh": ["{expression} = {result}。", "结果是{result}。", "{expression}等于{result}。"],
}

# -- unit conversion ------------------------------------------------------------------------------------

# unit code -> (English name, Chinese name); pairs convert both ways.
UNITS = {"km": ("kilometers", "公里"), "mi": ("miles", "英里"), "kg": ("kilograms", "千克"), "lb": ("pounds", "磅"),
         "m": ("meters", "米"), "ft": ("feet", "英尺"), "cm": ("centimeters", "厘米"), "in": ("inches", "英寸"),
         "L": ("liters", "升"), "gal": ("gallons", "加仑"), "celsius": ("degrees Celsius", "摄氏度"),
         "fahrenheit": ("degrees Fahrenheit", "华氏度")}
# (unit, unit, how many of the second make one of the first); temperature is handled apart.
UNIT_PAIRS = [("km", "mi", 1 / 1.609344), ("kg", "lb", 1 / 0.45359237), ("m", "ft", 1 / 0.3048),
              ("in", "cm", 2.54), ("gal", "L", 3.785411784), ("celsius", "fahrenheit", None)]
CONVERT_QUESTIONS = {
    "en": ["Convert {value} {from_name} to {to_name}.", "How many {to_name} is {value} {from_name}?",
           "What is {value} {from_name} in {to_name}?", "{value} {from_name} to {to_name}, please."],
    "zh": ["把{value}{from_name}换算成{to_name}。", "{value}{from_name}等于多少{to_name}？", "{value}{from_name}是多少{to_name}？",
           "请把{value}{from_name}转换为{to_name}"],
}
CONVERT_ANSWERS = {
    "en": ["{value} {from_name} is about {result} {to_name}.", "That is about {result} {to_name}."],
    "zh": ["{value}{from_name}约等于{result}{to_name}。", "换算结果约为{result}{to_name}。"],
}

# -- code interpreter ------------------------------------------------------------------------------------

INTERPRETER_SYSTEM = {
    "en": "You are glmkit-demo, connected to a computer without internet access. You can run Python code in "
          "a code interpreter and see its result.",
    "zh": "你是 glmkit-demo，你连接着一台电脑，但请注意不能联网。你可以在代码解释器中运行 Python 代码并得到结果。",
}
# task -> (English questions, Chinese questions, code, English answer, Chinese answer); {n}/{m} filled in.
INTERPRETER_TASKS = {
    "sum_squares": (["Use Python to compute the sum of the squares from 1 to {n}.",
                     "Run code to add up i**2 for i from 1 to {n}."],
                    ["用 Python 计算1到{n}的平方和。", "写代码求1到{n}每个数的平方之和。"],
                    "print(sum(i ** 2 for i in range(1, {n} + 1)))",
                    "The sum of the squares from 1 to {n} is {result}.", "1到{n}的平方和是{result}。"),
    "factorial": (["Use Python to compute {n} factorial.", "Write and run code to find the factorial of {n}."],
                  ["用 Python 计算{n}的阶乘。", "请写代码计算{n}!"],
                  "import math\nprint(math.factorial({n}))",
                  "{n}! is {result}.", "{n}的阶乘是{result}。"),
    "fibonacci": (["Use code to find the Fibonacci number F({n}), with F(0) = 0 and F(1) = 1.",
                   "Run Python to get Fibonacci number F({n})."],
                  ["用代码求斐波那契数F({n})，其中F(0) = 0，F(1) = 1。", "请用 Python 计算斐波那契数F({n})。"],
                  "a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, a + b\nprint(a)",
                  "F({n}) = {result}.", "F({n}) = {result}。"),
    "power": (["Use Python to compute 2 to the power of {n}.", "Run code to calculate 2 ** {n}."],
              ["用 Python 计算2的{n}次方。", "写代码算一下2的{n}次方。"],
              "print(2 ** {n})",
              "2 to the power of {n} is {result}.", "2的{n}次方是{result}。"),
    "gcd": (["Use Python to find the greatest common divisor of {n} and {m}.",
             "Run code to get the GCD of {n} and {m}."],
            ["用 Python 求{n}和{m}的最大公约数。", "写代码计算{n}和{m}的最大公约数。"],
            "import math\nprint(math.gcd({n}, {m}))",
            "The greatest common divisor of {n} and {m} is {result}.", "{n}和{m}的最大公约数是{result}。"),
    "sum_range": (["Use Python to add up all integers from 1 to {n}.", "Run code to sum the numbers 1 to {n}."],
                  ["用 Python 计算1加到{n}的和。", "写代码求从1到{n}所有整数的和。"],
                  "print(sum(range(1, {n} + 1)))",
                  "The sum of the integers from 1 to {n} is {result}.", "1加到{n}的和是{result}。"),
}

# -- refusing a tool that was not declared ------------------------------------------------------------------

REFUSAL_MARKERS = {"en": "Sorry", "zh": "抱歉"}  # every refusal says so
REFUSALS = {  # tool -> (English answer, Chinese answer)
    "get_weather": ("Sorry, I can't check the weather: no weather tool is available to me here.",
                    "抱歉，我这里没有可用的天气查询工具，无法查询天气。"),
    "calculator": ("Sorry, no calculator tool is available to me here, so I can't compute this reliably.",
                   "抱歉，我这里没有可用的计算器工具，无法可靠地完成这个计算。"),
    "convert_units": ("Sorry, no unit conversion tool is available to me here.",
                      "抱歉，我这里没有可用的单位换算工具。"),
}
