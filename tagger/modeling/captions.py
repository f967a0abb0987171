"""Captions composed from catalogue metadata, with the vocabulary shops actually use.

Every caption is stored with the attributes it mentions (article type, colour group, gender,
usage, season) so training can tell which *other* images in a batch it also describes
(label-aware InfoNCE targets): "black sneakers" is true of every black casual shoe in the batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Attribute slots in the order used by the id arrays (-1 = not mentioned / unknown).
SLOTS = ("type", "colour", "gender", "usage", "season")

# How article types are written in shops (first entry = display name used in eval prompts).
TYPE_NAMES: dict[str, list[str]] = {
    "Tshirts": ["t-shirt", "tee", "tshirt", "t shirt", "short sleeve top"],
    "Shirts": ["shirt", "button-down shirt", "collared shirt", "long sleeve shirt"],
    "Casual Shoes": ["casual shoes", "sneakers", "trainers", "shoes", "lace-up shoes"],
    "Sports Shoes": ["sports shoes", "running shoes", "athletic shoes", "training shoes", "sneakers"],
    "Formal Shoes": ["formal shoes", "dress shoes", "leather shoes", "oxfords", "derby shoes"],
    "Watches": ["watch", "wristwatch", "analog watch"],
    "Kurtas": ["kurta", "tunic kurta", "indian kurta"],
    "Kurtis": ["kurti", "short kurta"],
    "Tops": ["top", "blouse", "women's top"],
    "Handbags": ["handbag", "bag", "purse", "tote bag", "shoulder bag"],
    "Heels": ["heels", "high heels", "pumps", "heeled sandals"],
    "Sunglasses": ["sunglasses", "shades", "eyewear"],
    "Sandals": ["sandals", "open shoes", "strappy sandals"],
    "Sports Sandals": ["sports sandals", "outdoor sandals"],
    "Flip Flops": ["flip flops", "slippers", "thong sandals", "slides"],
    "Wallets": ["wallet", "billfold", "leather wallet"],
    "Belts": ["belt", "leather belt"],
    "Sweaters": ["sweater", "jumper", "pullover", "knitwear"],
    "Sweatshirts": ["sweatshirt", "hoodie", "crewneck sweatshirt"],
    "Trousers": ["trousers", "pants", "chinos", "slacks"],
    "Jeans": ["jeans", "denim jeans", "denim pants"],
    "Socks": ["socks", "pair of socks", "ankle socks"],
    "Briefs": ["briefs", "underwear", "underpants"],
    "Trunk": ["trunks", "boxer briefs", "underwear"],
    "Boxers": ["boxers", "boxer shorts"],
    "Backpacks": ["backpack", "rucksack", "school bag"],
    "Rucksacks": ["rucksack", "backpack"],
    "Jackets": ["jacket", "outerwear", "coat", "bomber jacket"],
    "Rain Jacket": ["rain jacket", "raincoat", "outerwear"],
    "Flats": ["flats", "ballet flats", "flat shoes", "loafers"],
    "Shorts": ["shorts", "bermuda shorts"],
    "Innerwear Vests": ["vest", "undershirt", "tank top"],
    "Caps": ["cap", "baseball cap", "hat"],
    "Hat": ["hat", "sun hat"],
    "Ties": ["tie", "necktie"],
    "Track Pants": ["track pants", "joggers", "sweatpants"],
    "Dresses": ["dress", "frock", "sundress"],
    "Perfume and Body Mist": ["perfume", "body mist", "fragrance"],
    "Deodorant": ["deodorant", "body spray"],
    "Bra": ["bra", "brassiere", "lingerie"],
    "Clutches": ["clutch", "evening bag", "clutch bag"],
    "Accessory Gift Set": ["accessory gift set", "gift set"],
    "Mufflers": ["muffler", "scarf"],
    "Scarves": ["scarf", "stole"],
    "Stoles": ["stole", "wrap scarf"],
    "Sarees": ["saree", "sari"],
    "Tunics": ["tunic", "long top"],
    "Skirts": ["skirt", "midi skirt"],
    "Leggings": ["leggings", "tights"],
    "Jeggings": ["jeggings", "denim leggings"],
    "Capris": ["capris", "cropped trousers", "three-quarter pants"],
    "Tracksuits": ["tracksuit", "track suit"],
    "Swimwear": ["swimwear", "swimsuit"],
    "Waistcoat": ["waistcoat", "vest"],
    "Duffel Bag": ["duffel bag", "travel bag", "gym bag"],
    "Laptop Bag": ["laptop bag", "messenger bag"],
    "Messenger Bag": ["messenger bag", "shoulder bag"],
    "Mobile Pouch": ["mobile pouch", "phone case"],
    "Waist Pouch": ["waist pouch", "belt bag", "fanny pack"],
    "Lounge Shorts": ["lounge shorts", "sleep shorts"],
    "Lounge Pants": ["lounge pants", "pyjama pants", "pajamas"],
    "Night suits": ["night suit", "pyjama set", "sleepwear"],
    "Nightdress": ["nightdress", "nightgown", "sleepwear"],
    "Baby Dolls": ["babydoll nightwear", "sleepwear"],
    "Camisoles": ["camisole", "cami top", "tank top"],
    "Shrug": ["shrug", "cropped cardigan"],
    "Churidar": ["churidar", "fitted trousers"],
    "Patiala": ["patiala pants", "salwar"],
    "Dupatta": ["dupatta", "long scarf"],
    "Kurta Sets": ["kurta set", "ethnic set"],
    "Clothing Set": ["clothing set", "outfit set"],
    "Rompers": ["romper", "playsuit"],
    "Jumpsuit": ["jumpsuit", "overall"],
    "Booties": ["booties", "ankle boots", "boots"],
    "Shoe Accessories": ["shoe accessories", "shoe laces", "insoles"],
    "Wristbands": ["wristband", "sweatband"],
    "Cufflinks": ["cufflinks"],
    "Stockings": ["stockings", "hosiery"],
    "Tights": ["tights", "hosiery"],
    "Gloves": ["gloves"],
    "Umbrellas": ["umbrella"],
    "Travel Accessory": ["travel accessory", "travel kit"],
    "Necklace and Chains": ["necklace", "chain", "pendant necklace"],
    "Pendant": ["pendant", "necklace"],
    "Bracelet": ["bracelet", "bangle"],
    "Bangle": ["bangle", "bracelet"],
    "Earrings": ["earrings", "studs"],
    "Ring": ["ring", "finger ring"],
    "Jewellery Set": ["jewellery set", "jewelry set"],
    "Basketballs": ["basketball", "ball"],
    "Free Gifts": ["free gift", "gift item"],
    "Fragrance Gift Set": ["fragrance gift set", "perfume set"],
    "Lipstick": ["lipstick"],
    "Lip Gloss": ["lip gloss"],
    "Lip Liner": ["lip liner"],
    "Lip Care": ["lip balm", "lip care"],
    "Nail Polish": ["nail polish", "nail paint"],
    "Kajal and Eyeliner": ["eyeliner", "kajal"],
    "Mascara": ["mascara"],
    "Eyeshadow": ["eyeshadow"],
    "Compact": ["compact powder", "face powder"],
    "Foundation and Primer": ["foundation", "primer"],
    "Highlighter and Blush": ["blush", "highlighter"],
    "Face Moisturisers": ["face moisturiser", "face cream"],
    "Sunscreen": ["sunscreen", "sun cream"],
    "Face Scrub and Exfoliator": ["face scrub", "exfoliator"],
    "Bath Robe": ["bath robe", "bathrobe"],
    "Ipad": ["ipad case", "tablet sleeve"],
}

# Near-identical catalogue colours merged into one group (also the eval label set).
COLOUR_GROUPS: dict[str, str] = {
    "Black": "black", "Blue": "blue", "Turquoise Blue": "blue", "Navy Blue": "navy",
    "White": "white", "Off White": "white", "Grey": "grey", "Grey Melange": "grey", "Charcoal": "grey",
    "Silver": "silver", "Steel": "silver", "Metallic": "silver",
    "Gold": "gold", "Bronze": "gold", "Copper": "gold",
    "Brown": "brown", "Coffee Brown": "brown", "Mushroom Brown": "brown", "Tan": "brown", "Rust": "brown",
    "Taupe": "brown",
    "Beige": "beige", "Cream": "beige", "Khaki": "beige", "Skin": "beige", "Nude": "beige",
    "Red": "red", "Maroon": "red", "Burgundy": "red",
    "Pink": "pink", "Magenta": "pink", "Peach": "pink", "Rose": "pink",
    "Purple": "purple", "Lavender": "purple", "Mauve": "purple",
    "Green": "green", "Olive": "green", "Sea Green": "green", "Fluorescent Green": "green",
    "Lime Green": "green", "Teal": "green",
    "Yellow": "yellow", "Mustard": "yellow", "Orange": "orange", "Multi": "multicolour",
}
COLOUR_LABELS = sorted(set(COLOUR_GROUPS.values()))
# Words shops use per colour group (the group name itself first).
COLOUR_WORDS: dict[str, list[str]] = {
    "black": ["black", "jet black"], "blue": ["blue", "light blue", "sky blue"], "navy": ["navy", "navy blue", "dark blue"],
    "white": ["white", "off-white"], "grey": ["grey", "gray", "charcoal"], "silver": ["silver", "steel", "metallic"],
    "gold": ["gold", "golden"], "brown": ["brown", "tan", "chocolate"], "beige": ["beige", "cream", "khaki"],
    "red": ["red", "maroon", "burgundy"], "pink": ["pink", "magenta", "peach"], "purple": ["purple", "violet", "lavender"],
    "green": ["green", "olive", "olive green"], "yellow": ["yellow", "mustard"], "orange": ["orange"],
    "multicolour": ["multicolour", "multicolored", "colourful"],
}
# Every colour word (lower case), to strip colours from titles for greyscale views.
_ALL_COLOUR_WORDS = sorted(
    {w for ws in COLOUR_WORDS.values() for w in ws} | {c.lower() for c in COLOUR_GROUPS} | {"melange", "gray"},
    key=len, reverse=True,
)
_COLOUR_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in _ALL_COLOUR_WORDS) + r")\b", re.IGNORECASE)

GENDER_LABELS = ["Men", "Women", "Unisex", "Boys", "Girls"]
GENDER_WORDS: dict[str, list[str]] = {
    "Men": ["men's", "men", "mens", "male"], "Women": ["women's", "women", "ladies", "womens"],
    "Unisex": ["unisex"], "Boys": ["boys'", "boys", "kids"], "Girls": ["girls'", "girls", "kids"],
}
GENDER_FOR: dict[str, list[str]] = {
    "Men": ["for men", "for him"], "Women": ["for women", "for her"], "Unisex": ["for men and women", "unisex"],
    "Boys": ["for boys", "for kids"], "Girls": ["for girls", "for kids"],
}

# Rare usages merged into the four that matter; None = unknown.
USAGE_GROUPS = {"Casual": "Casual", "Smart Casual": "Casual", "Travel": "Casual", "Sports": "Sports",
                "Formal": "Formal", "Party": "Formal", "Ethnic": "Ethnic"}
USAGE_LABELS = ["Casual", "Sports", "Formal", "Ethnic"]
USAGE_WORDS: dict[str, list[str]] = {
    "Casual": ["casual", "everyday", "casual wear"], "Sports": ["sports", "athletic", "sportswear", "gym"],
    "Formal": ["formal", "office", "business"], "Ethnic": ["ethnic", "traditional", "indian ethnic"],
}
SEASON_LABELS = ["Summer", "Winter", "Fall", "Spring"]
SEASON_WORDS = {"Summer": ["summer"], "Winter": ["winter"], "Fall": ["autumn", "fall"], "Spring": ["spring"]}


def type_names(article_type: str) -> list[str]:
    """Shop words for an article type; unknown types fall back to the lower-cased label."""
    return TYPE_NAMES.get(article_type, [article_type.lower()])


def strip_colours(text: str) -> str:
    """Remove colour words (for captions of greyscale views)."""
    return re.sub(r"\s+", " ", _COLOUR_RE.sub("", text)).strip()


@dataclass
class Item:
    """Normalised metadata of one product; attribute ids index the *_LABELS lists (-1 unknown)."""

    id: int
    article_type: str
    colour: str | None  # colour group
    gender: str | None
    usage: str | None
    season: str | None
    title: str | None


def item_from_row(row: dict) -> Item:
    colour = COLOUR_GROUPS.get(row.get("baseColour") or "")
    usage = USAGE_GROUPS.get(row.get("usage") or "")
    gender = row.get("gender") if row.get("gender") in GENDER_LABELS else None
    season = row.get("season") if row.get("season") in SEASON_LABELS else None
    return Item(int(row["id"]), str(row["articleType"]), colour, gender, usage, season, row.get("productDisplayName"))


# Templates: (format, slots it mentions). {t}=type, {c}=colour, {g}=gender adj, {gf}=gender "for",
# {u}=usage, {s}=season. Short attribute-only prompts teach the zero-shot label prompts.
TEMPLATES: list[tuple[str, tuple[str, ...]]] = [
    ("a photo of a {c} {t}", ("type", "colour")),
    ("{c} {t}", ("type", "colour")),
    ("{g} {c} {t}", ("type", "colour", "gender")),
    ("{c} {t} {gf}", ("type", "colour", "gender")),
    ("{g} {u} {t}", ("type", "gender", "usage")),
    ("{u} {c} {t}", ("type", "colour", "usage")),
    ("{g} {u} {c} {t} for {s}", ("type", "colour", "gender", "usage", "season")),
    ("a photo of a {t}", ("type",)),
    ("{t}", ("type",)),
    ("{g} {t}", ("type", "gender")),
    ("{t} {gf}", ("type", "gender")),
    ("a {s} {t}", ("type", "season")),
    ("{u} {t}", ("type", "usage")),
    ("a {c} product", ("colour",)),
    ("something {c}", ("colour",)),
    ("{c} colour", ("colour",)),
    ("fashion {gf}", ("gender",)),
    ("a {g} product", ("gender",)),
    ("{u} wear", ("usage",)),
    ("a product for {u} use", ("usage",)),
    ("{s} collection", ("season",)),
]


@dataclass
class Caption:
    text: str
    slots: tuple[str, ...]  # attributes it mentions; ("title",) for product titles


def item_captions(item: Item, rng: np.random.Generator, n: int, with_colour: bool = True) -> list[Caption]:
    """``n`` template captions for one item (random templates and synonyms), plus its title.

    ``with_colour=False`` (greyscale views) keeps only colour-free templates and strips colour
    words from the title.
    """
    out: list[Caption] = []
    if item.title:
        title = item.title if with_colour else strip_colours(item.title)
        out.append(Caption(title, ("title",)))
    usable = [
        (fmt, slots) for fmt, slots in TEMPLATES
        if all(getattr(item, _ATTR[s]) is not None for s in slots) and (with_colour or "colour" not in slots)
    ]
    if not usable:
        return out
    for k in rng.choice(len(usable), size=min(n, len(usable)), replace=False):
        fmt, slots = usable[int(k)]
        text = fmt.format(
            t=_pick(rng, type_names(item.article_type)),
            c=_pick(rng, COLOUR_WORDS[item.colour]) if item.colour else "",
            g=_pick(rng, GENDER_WORDS[item.gender]) if item.gender else "",
            gf=_pick(rng, GENDER_FOR[item.gender]) if item.gender else "",
            u=_pick(rng, USAGE_WORDS[item.usage]) if item.usage else "",
            s=_pick(rng, SEASON_WORDS[item.season]) if item.season else "",
        )
        out.append(Caption(text, slots))
    return out


_ATTR = {"type": "article_type", "colour": "colour", "gender": "gender", "usage": "usage", "season": "season"}


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]
