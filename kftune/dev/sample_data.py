"""Deterministic synthetic SFT data: Xiaohongshu (小红书) store-visit posts written for shops.

No hub is reachable, so demos and tests need a data set the project can make itself. Posts
follow one learnable shape (title with emoji, body built from the highlights and the price,
a 📍 line, 3-5 hashtags) with enough template variety that a tiny model has something to
learn in a few CPU minutes. Same (rows, format, seed) gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from kftune.core.errors import KftuneError
from kftune.data.formats import alpaca_to_messages

FORMATS = ("alpaca", "messages")

SYSTEM_PROMPT = "你是一名小红书探店博主，擅长根据店铺信息写真实、有温度、带emoji和话题标签的种草笔记。"

INSTRUCTIONS = (
    "为这家店写一篇小红书探店笔记。",
    "根据下面的店铺信息，写一篇小红书风格的探店文案。",
    "请帮这家店写一条小红书种草笔记。",
    "用小红书的风格为这家店写一篇推荐笔记。",
)

CITIES = ("成都", "上海", "北京", "杭州", "广州", "深圳", "重庆", "南京", "武汉", "长沙", "西安", "厦门")

NAME_PREFIXES = (
    "拾光",
    "晨曦",
    "山野",
    "半糖",
    "白日梦",
    "慢半拍",
    "小森林",
    "鹿角",
    "云朵",
    "橘子",
    "南风",
    "木子",
    "青柠",
    "星河",
    "暖阳",
    "一隅",
    "猫爪",
    "海盐",
    "栗子",
    "知夏",
    "闲云",
    "蓝鲸",
    "柚见",
    "月光",
)

SPARKS = ("✨", "💯", "🥰", "🔥", "💕", "🌟", "👍", "😍", "🙌", "🎉")


@dataclass(frozen=True)
class Category:
    """One shop category: how it is named, what it is praised for and what it costs."""

    label: str  # 品类 as written in the input, e.g. 咖啡店
    emoji: str
    verb: str  # what one does there: 喝 / 吃 / 逛 ...
    suffixes: tuple[str, ...]  # shop-name endings
    tag: str  # the category hashtag
    extra_tags: tuple[str, ...]
    price: tuple[int, int]  # per person, yuan
    highlights: tuple[tuple[str, str], ...]  # (highlight, the comment a post makes on it)


CATEGORIES: tuple[Category, ...] = (
    Category(
        "咖啡店",
        "☕",
        "喝",
        ("咖啡", "Coffee", "咖啡馆"),
        "#咖啡",
        ("#咖啡探店", "#咖啡店推荐", "#周末去哪儿"),
        (25, 60),
        (
            ("手冲耶加雪菲", "花香明显，回甘超干净"),
            ("海盐拿铁", "咸甜平衡，奶香很浓"),
            ("落地窗阳光位", "下午的光线拍照超出片"),
            ("自家烘焙豆子", "新鲜度肉眼可见"),
            ("可以带宠物", "店里还有一只超乖的店猫"),
            ("巴斯克蛋糕", "绵密不腻，和咖啡是绝配"),
            ("安静的办公区", "插座多，适合一个人待一下午"),
            ("冰博克澳白", "奶味醇厚，一口就爱上"),
        ),
    ),
    Category(
        "火锅店",
        "🍲",
        "吃",
        ("火锅", "老火锅", "火锅馆"),
        "#火锅",
        ("#火锅推荐", "#美食探店", "#吃货日常"),
        (80, 160),
        (
            ("牛油红锅", "香辣够味，越煮越香"),
            ("鲜切黄牛肉", "现切现上，嫩到不行"),
            ("手打虾滑", "Q弹有颗粒感，必点"),
            ("菌汤锅底", "鲜到可以直接喝汤"),
            ("现炸酥肉", "外酥里嫩，端上来就被抢光"),
            ("贴心的服务", "会主动帮忙下菜和加汤"),
            ("营业到凌晨", "夜宵党的快乐老家"),
            ("九宫格锅", "一人一格，吃得超过瘾"),
        ),
    ),
    Category(
        "面包店",
        "🥐",
        "吃",
        ("面包房", "烘焙", "Bakery"),
        "#面包",
        ("#烘焙", "#面包店推荐", "#碳水快乐"),
        (20, 50),
        (
            ("黄油可颂", "层次分明，一口掉渣"),
            ("脏脏包", "巧克力超浓郁，吃完满嘴幸福"),
            ("每日现烤", "下午四点出炉还是热乎的"),
            ("欧包系列", "低糖有嚼劲，当早餐刚好"),
            ("肉松小贝", "咸甜口，小朋友都爱吃"),
            ("开放式厨房", "能看到师傅现场揉面"),
            ("生吐司", "拉丝柔软，直接撕着吃"),
            ("抹茶麻薯包", "抹茶味浓，麻薯软糯"),
        ),
    ),
    Category(
        "美甲店",
        "💅",
        "做",
        ("美甲", "美甲工作室", "Nail"),
        "#美甲",
        ("#美甲分享", "#显白美甲", "#美甲店推荐"),
        (99, 299),
        (
            ("猫眼款式", "光泽感绝了，手一动就闪"),
            ("手绘花卉", "美甲师手超稳，细节满分"),
            ("日式建构", "持久不翘边，戴了三周还很新"),
            ("环境干净", "工具一客一消毒，很安心"),
            ("不推销办卡", "全程没有被推销，体验很舒服"),
            ("免费手部护理", "做完手都变嫩了"),
            ("款式更新快", "每周都有新款可以选"),
            ("可以预约到晚上", "下班过来也不赶"),
        ),
    ),
    Category(
        "书店",
        "📚",
        "逛",
        ("书店", "书房", "书屋"),
        "#书店",
        ("#独立书店", "#城市漫步", "#周末去哪儿"),
        (30, 80),
        (
            ("独立出版物", "好多在别处买不到的书"),
            ("二楼阅读区", "安静又舒服，可以看一整天"),
            ("文创周边", "书签和帆布包都好可爱"),
            ("每周读书会", "认识了好多有趣的人"),
            ("店主选书", "每本都有手写推荐卡"),
            ("复古装修", "木质书架超有氛围感"),
            ("书咖一体", "点一杯咖啡就能随便看"),
            ("露台座位", "傍晚坐在外面看书很惬意"),
        ),
    ),
    Category(
        "健身房",
        "🏋",
        "练",
        ("健身", "健身工作室", "Fitness"),
        "#健身",
        ("#健身打卡", "#自律生活", "#健身房推荐"),
        (50, 150),
        (
            ("器械很新", "力量区的器材基本都是新款"),
            ("私教很专业", "动作纠正得特别细"),
            ("24小时营业", "什么时候想练都可以"),
            ("淋浴间干净", "还有免费的洗护用品"),
            ("团课丰富", "普拉提和搏击操都有"),
            ("不强制办卡", "可以按次付费，很灵活"),
            ("人少不用排队", "器械基本随到随用"),
            ("有体测仪", "每个月都能看到自己的变化"),
        ),
    ),
    Category(
        "花店",
        "💐",
        "逛",
        ("花店", "花艺", "花房"),
        "#花店",
        ("#花艺", "#鲜花", "#仪式感"),
        (60, 200),
        (
            ("进口郁金香", "颜色超正，插在家里好治愈"),
            ("花束包装", "配色高级，送人超有面子"),
            ("花艺课", "零基础也能做出好看的花束"),
            ("当日鲜花", "每天早上从花市新进"),
            ("可以定制", "老板会按预算帮你搭配"),
            ("同城配送", "下单两小时就送到了"),
            ("干花系列", "能放很久，摆在书桌上刚好"),
            ("店面超出片", "门口随手一拍就是大片"),
        ),
    ),
    Category(
        "奶茶店",
        "🧋",
        "喝",
        ("茶饮", "奶茶", "茶铺"),
        "#奶茶",
        ("#奶茶推荐", "#喝奶茶", "#饮品店"),
        (15, 35),
        (
            ("芋泥波波", "芋泥绵密，波波软糯"),
            ("鲜果茶", "水果给得超多，很清爽"),
            ("可以选低糖", "三分糖刚刚好，不会腻"),
            ("厚乳奶盖", "奶盖咸甜，口感很绵"),
            ("手煮珍珠", "Q弹有嚼劲，还有红糖香"),
            ("茶底很香", "茶味浓，不是香精味"),
            ("杯子很好看", "拿在手上拍照很上镜"),
            ("出杯很快", "排队也不用等太久"),
        ),
    ),
    Category(
        "日料店",
        "🍣",
        "吃",
        ("日料", "居酒屋", "寿司"),
        "#日料",
        ("#日料推荐", "#美食探店", "#约会餐厅"),
        (120, 300),
        (
            ("三文鱼刺身", "厚切肥美，入口即化"),
            ("炙烤寿司", "火候刚好，油脂香气很足"),
            ("吧台座位", "能看师傅现场捏寿司"),
            ("鳗鱼饭", "酱汁浓郁，鳗鱼很厚"),
            ("清酒种类多", "店员会帮忙推荐搭配"),
            ("环境安静", "适合约会和小聚"),
            ("天妇罗", "面衣薄脆，一点都不油"),
            ("季节限定", "每个月都有新菜单"),
        ),
    ),
    Category(
        "烧烤店",
        "🍢",
        "吃",
        ("烧烤", "烤串", "烧烤屋"),
        "#烧烤",
        ("#烧烤推荐", "#夜宵", "#美食探店"),
        (60, 120),
        (
            ("炭烤羊肉串", "肥瘦相间，孜然味很香"),
            ("烤生蚝", "蒜蓉铺满，个头超大"),
            ("秘制烤翅", "外皮焦香，里面很多汁"),
            ("户外座位", "夏天晚上吹着风撸串太爽了"),
            ("烤韭菜", "调料很入味，一点不塞牙"),
            ("冰啤酒", "配烧烤简直完美"),
            ("营业到凌晨", "夜宵首选"),
            ("烤馒头片", "刷上酱烤得酥酥脆脆"),
        ),
    ),
)

TITLES = (
    "{emoji}{city}这家{cat}也太宝藏了吧{spark}",
    "【{city}探店】{name}｜{h1}绝了{spark}",
    "{emoji}在{city}挖到一家宝藏{cat}{spark}",
    "{spark}{name}｜人均{price}的快乐{emoji}",
    "{emoji}{city}{cat}天花板｜{name}{spark}",
    "【{cat}推荐】{city}{name}，{verb}过都说好{emoji}",
)

OPENERS = (
    "周末和朋友来了{name}，一进门就很喜欢{spark}",
    "终于打卡了{city}的{name}！",
    "刷到好多次的{name}，今天终于来了～",
    "在{city}发现的宝藏{cat}，必须分享给大家{spark}",
)

FIRST_HIGHLIGHT = ("最惊喜的是{h}，{c}{spark}", "{h}真的绝了，{c}{spark}", "强推{h}，{c}{spark}")
MORE_HIGHLIGHT = ("{h}也很加分，{c}。", "另外{h}也不错，{c}。", "还有{h}，{c}。")

PRICES = ("人均{price}元，性价比很高{spark}", "人均才{price}元，真的不贵！", "人均{price}元，这个价格很值了{spark}")

CLOSINGS = ("下次还会再来！", "姐妹们冲就完事了！", "已经在计划二刷了～", "真心推荐给{city}的朋友们！")


def _post(rng: random.Random, cat: Category, name: str, city: str, picks: list[tuple[str, str]], price: int) -> str:
    """Render one post: title line, body line, 📍 line, hashtag line."""

    def spark() -> str:
        return rng.choice(SPARKS)

    fields = {"emoji": cat.emoji, "city": city, "cat": cat.label, "verb": cat.verb, "name": name, "price": price}
    title = rng.choice(TITLES).format(h1=picks[0][0], spark=spark(), **fields)
    body = [rng.choice(OPENERS).format(spark=spark(), **fields)]
    (h, c), *rest = picks
    body.append(rng.choice(FIRST_HIGHLIGHT).format(h=h, c=c, spark=spark()))
    body.extend(rng.choice(MORE_HIGHLIGHT).format(h=h, c=c) for h, c in rest)
    body.append(rng.choice(PRICES).format(price=price, spark=spark()))
    body.append(rng.choice(CLOSINGS).format(city=city))
    place = f"📍{city}·{name}"
    tags = [f"#{city}探店", cat.tag, *rng.sample(cat.extra_tags, rng.randint(1, 3))]
    return "\n".join([title, "".join(body), place, " ".join(tags)])


def _sample(rng: random.Random) -> dict[str, str]:
    """One alpaca row: shop facts in `input`, the post in `output`."""
    cat = rng.choice(CATEGORIES)
    name = rng.choice(NAME_PREFIXES) + rng.choice(cat.suffixes)
    city = rng.choice(CITIES)
    picks = rng.sample(cat.highlights, rng.randint(2, 3))
    low, high = cat.price
    price = rng.randint(low, high)
    facts = f"店名：{name}\n品类：{cat.label}\n城市：{city}\n亮点：{'、'.join(h for h, _ in picks)}\n人均：{price}元"
    return {
        "instruction": rng.choice(INSTRUCTIONS),
        "input": facts,
        "output": _post(rng, cat, name, city, picks, price),
    }


def messages_row(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The messages-form row of an alpaca sample, with the blogger system prompt."""
    return {"messages": alpaca_to_messages({**row, "system": SYSTEM_PROMPT})}


def generate_samples(rows: int, fmt: str = "alpaca", seed: int = 0) -> list[dict]:
    """`rows` posts in alpaca or messages form; a private RNG keeps them independent of global state."""
    if rows < 1:
        raise KftuneError(f"--rows must be at least 1, got {rows}")
    if fmt not in FORMATS:
        raise KftuneError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rng = random.Random(seed)
    samples = [_sample(rng) for _ in range(rows)]
    return samples if fmt == "alpaca" else [messages_row(s) for s in samples]


def write_samples(path: str | os.PathLike, rows: int, fmt: str = "alpaca", seed: int = 0) -> Path:
    """Write the samples as UTF-8 JSONL; a temp file renamed into place means the file is complete or absent."""
    target = Path(path)
    if target.is_dir():
        raise KftuneError(f"{target} is a directory; give a file path for the JSONL output")
    samples = generate_samples(rows, fmt, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(text.encode("utf-8"))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kftune sample-data", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="JSONL file to write")
    parser.add_argument("--rows", type=int, default=600, help="number of posts (default 600)")
    parser.add_argument("--format", default="alpaca", help="alpaca or messages (default alpaca)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    out = write_samples(args.file, args.rows, args.format, args.seed)
    print(f"wrote {args.rows} {args.format} rows to {out}")
    return 0
