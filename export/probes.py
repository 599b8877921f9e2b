"""The built-in probe set the export's parity check runs: short and long texts, many scripts, odd input."""

from __future__ import annotations

_LONG = (
    "The history of natural language processing generally started in the 1950s, although work can be "
    "found from earlier periods. In 1950, Alan Turing published an article titled Computing Machinery "
    "and Intelligence which proposed what is now called the Turing test as a criterion of intelligence. "
)

PROBE_TEXTS: tuple[str, ...] = (
    "",
    " ",
    "a",
    "Hello world!",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog.",
    "how do i reset my password",
    "BGE models map text to dense vectors for retrieval, clustering and semantic search.",
    "北京是中华人民共和国的首都。",
    "为这个句子生成表示以用于检索相关文章：熊猫吃什么？",
    "東京は日本の首都です。",
    "서울은 대한민국의 수도이다.",
    "Москва — столица России.",
    "القاهرة هي عاصمة مصر.",
    "नई दिल्ली भारत की राजधानी है।",
    "Ελληνικά: η Αθήνα είναι η πρωτεύουσα.",
    "Ça coûte 12,50 € — naïve façade, résumé.",
    "emoji 🙂🚀🔥 and symbols ∑∫√ ≠ ≤",
    "def add(a, b):\n    return a + b  # code",
    "https://example.com/path?query=1&x=y#frag",
    "3.14159 2.71828 1.41421 42 1e-9 -7",
    "tabs\tand\nnewlines\r\nmixed   spaces",
    "UPPER lower MiXeD CaSe",
    "a " * 300,
    _LONG * 2,
    _LONG * 12,
    "词" * 700,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\u200b zero width \u00a0 nbsp \ufeff bom",
)

PROBE_PAIRS: tuple[tuple[str, str], ...] = (
    ("what is a panda?", "The giant panda is a bear species endemic to China."),
    ("what is a panda?", "hi"),
    ("what is a panda?", ""),
    ("", "An empty query still scores."),
    ("capital of France", "Paris is the capital and most populous city of France."),
    ("capital of France", "Berlin is the capital of Germany."),
    ("熊猫吃什么？", "大熊猫主要以竹子为食。"),
    ("Москва", "Москва — столица России."),
    ("long passage", _LONG * 12),
    (_LONG * 10, "a very long query is cut to three quarters of max_length"),
    (_LONG * 10, _LONG * 10),
    ("emoji 🙂", "symbols ∑∫√ and code def f(): pass"),
)

# Ordinary sentences for the int8/fp16 quality gate, beside the probe set's odd ones: short conversational
# sentences are where dynamic int8 drifts most (measured on all-MiniLM-L6-v2), so there are many of them.
_GATE_SENTENCES: tuple[str, ...] = (
    "Thanks, that works.",
    "It depends on the situation.",
    "You answered your own question.",
    "This is a great one...",
    "I don't see why that would be a problem.",
    "There's not much you can do about it.",
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "Two dogs run across a snowy field.",
    "The children are playing in the park.",
    "Stocks fell sharply after the announcement.",
    "The senate passed the bill late on Tuesday.",
    "Where can I buy a cheap train ticket?",
    "how many calories are in an apple",
    "best way to learn python for data analysis",
    "Is it safe to drink tap water in Lisbon?",
    "Vitamin D deficiency is associated with an increased risk of fractures.",
    "The protein binds to the receptor and blocks the signalling pathway.",
    "Mutations in this gene cause a rare form of inherited blindness.",
    "Patients treated with the drug showed no significant improvement over placebo.",
    "The study followed 12,000 adults for ten years.",
    "Climate change is raising sea levels faster than expected.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Please restart the server and clear the cache before testing again.",
    "The function returns None when the key is missing.",
    "He said he would call back tomorrow morning.",
    "I love this phone, but the battery life is terrible.",
    "The hotel was clean and the staff were friendly.",
    "No.",
    "Yes, absolutely!",
    "Why?",
    "OK",
    "The meeting has been moved to 3 pm on Friday.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The treaty was signed in 1648, ending the Thirty Years' War.",
    "Der Hund schläft auf dem Sofa.",
    "El tren sale a las ocho de la mañana.",
    "我今天很忙，明天再说吧。",
    (
        "Transformer encoders read the whole sentence at once: every token attends to every other token, "
        "and the states of the last layer are pooled into one vector that stands for the sentence."
    ),
    (
        "Background: randomised trials of exercise in older adults have reported mixed effects on cognition. "
        "Methods: we pooled data from 24 trials with 3,500 participants and estimated the effect of "
        "aerobic training on memory and executive function. Results: aerobic training improved executive "
        "function slightly, with no effect on memory. Conclusion: the benefit, if any, is small."
    ),
)

GATE_TEXTS: tuple[str, ...] = PROBE_TEXTS + _GATE_SENTENCES

GATE_PAIRS: tuple[tuple[str, str], ...] = PROBE_PAIRS + tuple(
    (query, passage)
    for query, passage in zip(
        _GATE_SENTENCES[12:16] * 5,
        _GATE_SENTENCES[:20],
    )
)

# Texts the int8 export calibrates on (SmoothQuant's per-channel activation maxima), apart from the gate texts so
# that the gate measures texts the calibration never saw: queries, sentences and passages of several domains and
# scripts, as the gate's are.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "how to cook rice in a pressure cooker",
    "what causes the northern lights",
    "symptoms of iron deficiency in adults",
    "python list comprehension with condition",
    "cheap flights from London to Rome in May",
    "who wrote the origin of species",
    "Is coffee bad for your heart?",
    "When does the library open on Sundays?",
    "A cat is sleeping on the windowsill.",
    "Three men are playing chess in the park.",
    "A girl is riding a horse along the beach.",
    "The plane landed safely despite the storm.",
    "Oil prices rose for the third day in a row.",
    "The committee will publish its report next month.",
    "She finished the marathon in under four hours.",
    "I'm not sure this is the right approach.",
    "Great product, fast delivery, would buy again.",
    "The room was small and the wifi kept dropping.",
    "Can you send me the slides after the call?",
    "The bug only appears when the cache is cold.",
    "Insulin resistance precedes the onset of type 2 diabetes by several years.",
    "The enzyme is expressed mainly in the liver and kidneys.",
    "Antibiotic use in early childhood was linked to a higher risk of asthma.",
    "The vaccine reduced hospital admissions by 60 percent in people over 65.",
    "The Roman Empire reached its greatest extent under Trajan.",
    "Water boils at a lower temperature at high altitude.",
    "Neural networks are trained by gradient descent on a loss function.",
    "Sure.",
    "Maybe later.",
    "Thank you!",
    "Die Katze schläft auf dem Dach.",
    "Le musée est fermé le mardi.",
    "La reunión empieza a las diez.",
    "天气预报说明天会下雨。",
    "この本はとても面白かったです。",
    "Я люблю читать по вечерам.",
    "def mean(xs):\n    return sum(xs) / len(xs)",
    "SELECT name, count(*) FROM users GROUP BY name;",
    "Order #4521 shipped on 2024-03-02, tracking 1Z999AA10123456784.",
    (
        "Objective: to assess whether a short course of physiotherapy improves recovery after knee surgery. "
        "Design: randomised controlled trial in four hospitals. Participants: 312 adults after total knee "
        "replacement. Results: at six months, walking speed and pain scores did not differ between groups."
    ),
    (
        "The river rises in the mountains to the north and flows south through a broad valley of farms and "
        "small towns before it reaches the sea. In spring the snowmelt swells it, and the lower valley floods "
        "in most years, which is why the old villages stand on higher ground."
    ),
    (
        "To configure the service, copy the example file to config.yaml, set the database URL and the port, "
        "and restart. Logs are written to the standard output; set LOG_LEVEL=debug to see each request, and "
        "use the health endpoint to check that the service is ready before sending traffic."
    ),
)
