"""Texts of the alignment-fidelity benchmark: 12 kinds, written for it (not from any dataset), each kind a
few responses that stress a different part of tokenization."""

TEXTS = {
    "english": [
        "The committee postponed its decision until the international review had been completed, "
        "which frustrated several members who had expected a quick resolution.",
        "Photosynthesis converts light energy into chemical energy; plants, algae and some bacteria "
        "store it in sugars that fuel nearly every food chain on Earth.",
        "She hadn't realized how late it was until the streetlights flickered on outside the library.",
    ],
    "code": [
        "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "for (let i = 0; i < items.length; i++) {\n  if (items[i].id === target) { return i; }\n}\nreturn -1;",
        "SELECT name, COUNT(*) AS n FROM orders WHERE total > 100 GROUP BY name ORDER BY n DESC LIMIT 10;",
    ],
    "numbers": [
        "The population grew from 1,234,567 in 1990 to 2,345,678 in 2020, an increase of 90.02%.",
        "Invoice 4471829: 37 units at $12.50 = $462.50, due 2024-11-30; call 555-0199 or 800 555 0123.",
        "pi = 3.14159265358979, e = 2.71828182845904, sqrt(2) = 1.41421356237309 and 1e-9 < 0.000001.",
    ],
    "urls": [
        "See https://docs.example.org/api/v2/users?id=12345&sort=desc#results or mail admin@example.com.",
        "Clone git@github.com:org/repo-name.git, then open http://localhost:8080/health_check.json.",
        "The file lives at /usr/local/share/data/config_v1.2.yaml and C:\\Users\\me\\Documents\\notes.txt.",
    ],
    "arabic": [
        "اللغة العربية من أكثر اللغات انتشارا في العالم، ويتحدث بها أكثر من أربعمائة مليون شخص.",
        "ذهب الطالب إلى المكتبة لاستعارة كتاب عن تاريخ العلوم في العصر الذهبي.",
        "السلام عليكم، كيف حالك اليوم؟ أتمنى أن تكون بخير.",
    ],
    "hindi": [
        "हिन्दी भारत की सबसे अधिक बोली जाने वाली भाषा है और इसकी लिपि देवनागरी है।",
        "कल सुबह हम सब मिलकर पहाड़ों की ओर यात्रा पर जाएंगे।",
        "विज्ञान और प्रौद्योगिकी ने हमारे जीवन को पूरी तरह बदल दिया है।",
    ],
    "chinese": [
        "东京是日本的首都，也是世界上人口最多的城市之一。",
        "机器学习是人工智能的一个分支，它让计算机能够从数据中学习。",
        "今天天气很好，我们去公园散步吧，顺便买一些水果。",
    ],
    "emoji": [
        "Great job 🎉🎉! See you at 9 🕘 — bring snacks 🍕🍩 and your laptop 💻 please 🙏",
        "Weather today: ☀️ then 🌧️, winds 💨 from the north; stay safe 😊 👍🏽",
        "Family trip: 👨‍👩‍👧‍👦 to the 🏔️, 3 nights ⛺ and one 🚗 breakdown 😅",
    ],
    "whitespace": [
        "Column A    Column B\n--------    --------\n  1           2\n\n\n  3           4\t\t5",
        "    indented four\n\tone tab\n\t\ttwo tabs\n        eight spaces then text",
        "Trailing spaces   \nand   several    runs     of     spaces   between words.  ",
    ],
    "markdown": [
        "## Summary\n\n- **Speed:** 2x faster than before\n- *Memory:* 40% less\n\n1. Install with `pip install x`\n"
        "2. Run `x --help`\n\n> Note: results may vary.",
        "| name | value |\n|---|---:|\n| alpha | 0.1 |\n| beta | 2.5 |\n\n"
        "See [the docs](https://example.com) for more.",
        "Sure! Here's how:\n\n```python\nprint(\"hello\")\n```\n\nLet me know if you need anything else 🙂",
    ],
    "european": [
        "Ærøskøbing ist eine kleine Stadt; naïve Fragen über Ångström und São Paulo sind willkommen.",
        "Le garçon a mangé une crème brûlée à côté de la fenêtre, très rapidement.",
        "Привет, как дела? Это предложение написано на русском языке для проверки.",
    ],
    "special_text": [
        "To end a turn the model writes <|im_end|> or <end_of_turn>; older models used </s> and <|eot_id|>.",
        "Tags like <s>, <pad> and <|endoftext|> are just text in this sentence.",
        "HTML: <div class=\"x\">a &amp; b</div> and a template {{ user }} {% if x %}y{% endif %}.",
    ],
}
