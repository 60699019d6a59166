"""Markup from a sandbox made inert: HTML, SVG, CSS and markdown.

A live output is trusted by JupyterLab: its HTML goes into the page with the
page's rights, so a sandbox that can put ``<img onerror=…>`` there can do
anything the user's browser can (read the server's token, start a host
kernel). What a sandbox sends is cleaned here with nh3 (Rust's ammonia, a
whitelist sanitizer: what is not named is dropped) into markup that cannot
run code and cannot fetch anything either: the sandbox has no network, and
an image or stylesheet URL in its output would be one (a request carrying
what the code read). What is kept is what tables, styled tables and plots
need: pandas' ``<style>`` block and classes, Styler's ids and per-cell rules,
``data:`` images, inline SVG, basic formatting, and links a person clicks.

Ids are prefixed (``sandbox-``) so that an output cannot shadow a global of
the page by naming an element after it (DOM clobbering); the selectors of
its own ``<style>`` blocks and its ``#fragment`` references get the same
prefix, so Styler's per-cell colours still apply.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Iterable

import nh3

#: Prefix given to every id (and the selectors and fragments naming them) in sanitized HTML.
ID_PREFIX = "sandbox-"

_SVG_TAGS = frozenset({
    "svg", "g", "defs", "symbol", "use", "title", "desc", "switch", "view", "style", "a",
    "path", "rect", "circle", "ellipse", "line", "polyline", "polygon", "image",
    "text", "tspan", "textPath", "clipPath", "mask", "pattern", "marker",
    "linearGradient", "radialGradient", "stop", "filter", "feBlend", "feColorMatrix",
    "feComponentTransfer", "feComposite", "feConvolveMatrix", "feDiffuseLighting",
    "feDisplacementMap", "feDistantLight", "feDropShadow", "feFlood", "feFuncA", "feFuncB",
    "feFuncG", "feFuncR", "feGaussianBlur", "feImage", "feMerge", "feMergeNode",
    "feMorphology", "feOffset", "fePointLight", "feSpecularLighting", "feSpotLight",
    "feTile", "feTurbulence",
})
# Left out on purpose: script, foreignObject (HTML inside SVG), animate, set,
# animateMotion, animateTransform (SMIL can set href to a javascript: URL).

_SVG_ATTRIBUTES = frozenset({
    "id", "class", "style", "transform", "d", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy",
    "r", "rx", "ry", "width", "height", "points", "viewBox", "preserveAspectRatio", "fill",
    "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-linecap",
    "stroke-linejoin", "stroke-dasharray", "stroke-dashoffset", "stroke-miterlimit",
    "stroke-opacity", "opacity", "clip-path", "clip-rule", "clipPathUnits", "mask",
    "maskUnits", "maskContentUnits", "filter", "filterUnits", "primitiveUnits",
    "font-family", "font-size", "font-style", "font-weight", "font-variant", "font-stretch",
    "text-anchor", "dominant-baseline", "alignment-baseline", "baseline-shift",
    "letter-spacing", "word-spacing", "text-decoration", "writing-mode", "dx", "dy",
    "rotate", "textLength", "lengthAdjust", "startOffset", "offset", "stop-color",
    "stop-opacity", "gradientUnits", "gradientTransform", "spreadMethod", "fx", "fy", "fr",
    "patternUnits", "patternContentUnits", "patternTransform", "markerWidth",
    "markerHeight", "markerUnits", "refX", "refY", "orient", "marker-start", "marker-mid",
    "marker-end", "href", "xmlns", "xlink", "version", "space", "display", "visibility",
    "overflow", "color", "vector-effect", "shape-rendering", "text-rendering",
    "image-rendering", "color-interpolation", "color-interpolation-filters", "paint-order",
    "in", "in2", "result", "stdDeviation", "mode", "operator", "k1", "k2", "k3", "k4",
    "values", "type", "tableValues", "slope", "intercept", "amplitude", "exponent",
    "flood-color", "flood-opacity", "lighting-color", "baseFrequency", "numOctaves", "seed",
    "stitchTiles", "scale", "xChannelSelector", "yChannelSelector", "radius", "order",
    "kernelMatrix", "divisor", "bias", "targetX", "targetY", "edgeMode", "preserveAlpha",
    "surfaceScale", "diffuseConstant", "specularConstant", "specularExponent", "azimuth",
    "elevation", "pointsAtX", "pointsAtY", "pointsAtZ", "limitingConeAngle", "z",
    "pointer-events", "direction", "unicode-bidi", "mix-blend-mode", "isolation", "lang",
    "role", "title",
})
# ``href`` also matches ``xlink:href`` and ``xlink`` the ``xmlns:xlink`` declaration:
# nh3 compares local names.

_HTML_TAGS = frozenset(nh3.ALLOWED_TAGS) | {"style", "tfoot", "font", "video", "audio",
                                            "source", "picture", "label"}
_HTML_ATTRIBUTES = frozenset({
    "class", "id", "style", "title", "lang", "dir", "role", "align", "valign", "width",
    "height", "border", "cellpadding", "cellspacing", "bgcolor", "colspan", "rowspan",
    "scope", "headers", "span", "summary", "abbr", "alt", "src", "href", "hreflang",
    "start", "reversed", "value", "datetime", "cite", "open", "controls", "loop", "muted",
    "poster", "preload", "media", "scoped", "face", "size", "char", "charoff", "nowrap",
})
# Not kept: event handlers, ``name`` (shadows globals), ``data-*`` (JupyterLab runs a
# command named by ``data-commandlinker-command`` on click), ``srcset``, ``ping``,
# ``background``, ``action``/``formaction``; and forms, frames, objects, scripts.

#: Attributes holding a URL the browser follows or fetches.
_URL_ATTRIBUTES = frozenset({"href", "src", "poster"})
#: Elements whose ``href`` a person clicks (the rest fetch it: use, image, feImage).
_LINKS = frozenset({"a", "area"})
#: What a fetched ``data:`` URL may hold, per element (an image never runs script);
#: other elements (``use``, ``pattern``…) may only name a fragment of the output.
_DATA_MEDIA = {"img": ("image/",), "image": ("image/",), "feImage": ("image/",),
               "feimage": ("image/",), "video": ("image/", "video/"), "audio": ("audio/",),
               "source": ("image/", "audio/", "video/")}

#: What the markers below find was (at least in part) removed: worth a visible note.
_ACTIVE = re.compile(
    r"<\s*/?\s*(?:script|iframe|frame|object|embed|applet|form|link|meta|base|portal|"
    r"foreignobject|animate\w*|set|template|noscript)\b"
    r"|<[^<>]*[\s\"'/]on[a-z]+\s*=|=\s*[\"']?\s*(?:java|vb)script\s*:|data-commandlinker",
    re.IGNORECASE,
)

NOTE_HTML = ("<div style=\"color:#b00;font-size:smaller\">[sandbox-kernel: scripts, event "
             "handlers or frames were removed from this output; <code>%session trust</code> "
             "allows them]</div>")


def inert_css(css: str) -> str:
    """CSS that fetches nothing: ``url()``, ``image-set()``, ``@import``… become ``none``.

    ``url(#id)`` (SVG references) and ``url(data:image/…)`` stay. Escapes and
    comments are removed first, so that ``u\\72l(`` or ``u/**/rl(`` cannot
    hide a fetch; what is left of a broken declaration is at worst invalid,
    which the browser drops.
    """
    if "(" not in css and "@" not in css and "\\" not in css:
        return css
    css = _CSS_COMMENT.sub("", css)
    css = _CSS_ESCAPE.sub("", css)
    css = _CSS_URL.sub(lambda m: m.group(0) if m.group(1) else "none", css)
    return _CSS_FETCH.sub(lambda m: "" if m.group(0).startswith("@") else "none", css)


_CSS_COMMENT = re.compile(r"/\*.*?(?:\*/|$)", re.DOTALL)
_CSS_ESCAPE = re.compile(r"\\(?:[0-9a-fA-F]{1,6}\s?|.|$)", re.DOTALL)
_CSS_URL = re.compile(r"\burl\s*\(\s*['\"]?\s*(#|data:image/)?[^)]*\)?", re.IGNORECASE)
_CSS_FETCH = re.compile(r"(?:-webkit-)?(?:image-set|cross-fade)\s*\([^)]*\)?|"
                        r"\b(?:image|src)\s*\([^)]*\)?|@import[^;]*;?", re.IGNORECASE)


_STYLE_BLOCK = re.compile(r"(<style\b[^>]*>)(.*?)(</style)", re.IGNORECASE | re.DOTALL)
_SELECTOR_ID = re.compile(r"#(-?[A-Za-z_][\w-]*)")


def _prefix_selectors(css: str, prefix: str) -> str:
    """Give the ids named by the selectors of a style sheet the prefix the elements got.

    A chunk that ends at ``{`` is a selector (or an at-rule's prelude, left
    alone); a chunk that ends at ``}`` is declarations, where ``#fff`` is a
    colour and must not change.
    """
    parts = re.split(r"([{}])", css)
    for i in range(0, len(parts) - 1, 2):
        if parts[i + 1] == "{" and not parts[i].lstrip().startswith("@"):
            parts[i] = _SELECTOR_ID.sub(lambda m: "#" + _prefixed(m.group(1), prefix),
                                        parts[i])
    return "".join(parts)


def _raw_text(css: str) -> str:
    """A style sheet that cannot end its ``<style>`` element: taking out a comment or an
    escape could have made ``</style>`` (``</**/style>``), and what follows would be live
    markup the sanitizer never saw."""
    return css.replace("<", "\\3c ")


def _prefixed(name: str, prefix: str) -> str:
    return name if name.startswith(prefix) else prefix + name


_URL_REF = re.compile(r"url\(\s*(['\"]?)#", re.IGNORECASE)


class Sanitizer:
    """One configured cleaner for HTML and one for SVG (nh3 ``Cleaner``s, built once)."""

    def __init__(self, link_schemes: Iterable[str] = ("http", "https", "mailto")) -> None:
        self.link_schemes = frozenset(s.lower() for s in link_schemes)
        self._html = nh3.Cleaner(
            tags=set(_HTML_TAGS | _SVG_TAGS),
            clean_content_tags={"script", "metadata", "noscript", "template", "iframe",
                                "object", "embed", "foreignObject"},
            attributes={"*": set(_HTML_ATTRIBUTES | _SVG_ATTRIBUTES)},
            attribute_filter=functools.partial(self._attribute, prefix=ID_PREFIX),
            url_schemes={*self.link_schemes, "data"},
            link_rel="noopener noreferrer", id_prefix=ID_PREFIX,
            generic_attribute_prefixes={"aria-"},
        )
        # An SVG document is shown as an <img> by JupyterLab (a document of its own,
        # where ids cannot clobber the page's globals): its ids stay as they are.
        self._svg = nh3.Cleaner(
            tags=set(_SVG_TAGS),
            clean_content_tags={"script", "metadata", "foreignObject"},
            attributes={"*": set(_SVG_ATTRIBUTES)},
            attribute_filter=functools.partial(self._attribute, prefix=""),
            url_schemes={*self.link_schemes, "data"}, link_rel="noopener noreferrer",
            generic_attribute_prefixes={"aria-"},
        )

    def html(self, markup: str) -> tuple[str, bool]:
        """Clean HTML; and whether active content (scripts, handlers, frames) was seen."""
        clean = self._html.clean(markup)
        if "<style" in clean or "<STYLE" in clean:
            clean = _STYLE_BLOCK.sub(lambda m: m.group(1) + _raw_text(_prefix_selectors(
                inert_css(m.group(2)), ID_PREFIX)) + m.group(3), clean)
        return clean, bool(_ACTIVE.search(markup))

    def svg(self, markup: str) -> tuple[str, bool]:
        """Clean an SVG document, still a standalone XML document (JupyterLab shows it as an
        image, which needs the namespace declarations); and whether active content was seen."""
        clean = self._svg.clean(markup).lstrip()  # the XML declaration and doctype are gone
        if "<style" in clean:
            clean = _STYLE_BLOCK.sub(
                lambda m: m.group(1) + _raw_text(inert_css(m.group(2))) + m.group(3), clean)
        head = clean[:clean.find(">") + 1] if clean.startswith("<svg") else ""
        if head and "xmlns=" not in head:
            clean = '<svg xmlns="http://www.w3.org/2000/svg"' + clean[4:]
            head = clean[:clean.find(">") + 1]
        if head and "xlink:" in clean and "xmlns:xlink" not in head:
            clean = '<svg xmlns:xlink="http://www.w3.org/1999/xlink"' + clean[4:]
        return clean, bool(_ACTIVE.search(markup))

    def _attribute(self, tag: str, attr: str, value: str, *, prefix: str) -> str | None:
        """nh3 calls this for every attribute it kept: URLs and CSS get a second look."""
        if attr == "style":
            return inert_css(value)
        if attr in _URL_ATTRIBUTES:
            return self._url(tag, attr, value, prefix)
        if "url(" in value or "URL(" in value:  # SVG paint, clip-path, marker, filter
            css = inert_css(value)
            return _URL_REF.sub(lambda m: f"url({m.group(1)}#{prefix}", css) if prefix else css
        return value

    def _url(self, tag: str, attr: str, value: str, prefix: str) -> str | None:
        bare = re.sub(r"[\x00-\x20]", "", value)
        if bare.startswith("#"):  # a reference within the output
            return "#" + _prefixed(bare[1:], prefix) if prefix and len(bare) > 1 else value
        scheme = _SCHEME.match(bare)
        if tag in _LINKS and attr == "href":  # followed when a person clicks it
            return value if scheme is None or scheme.group(1).lower() in self.link_schemes \
                else None
        # Fetched when shown: only what the output carries itself.
        kinds = _DATA_MEDIA.get(tag)
        if kinds and scheme is not None and scheme.group(1).lower() == "data":
            return value if bare[5:].lower().startswith(kinds) else None
        return None


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")

# -- markdown -------------------------------------------------------------------------

#: Raw HTML (a tag, a comment, a processing instruction) or an autolink.
_MD_HTML = re.compile(r"<[A-Za-z/!?]")
#: Every inline destination ``](dest``, whatever the text before it (brackets nest), and
#: every reference definition ``[label]: dest``.
_MD_DEST = re.compile(r"\]\(\s*([^)\s]*)|^ {0,3}\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
#: An image whose destination is a ``data:`` image, written plainly.
_MD_DATA_IMAGE = re.compile(r"!\[[^\[\]]*\]\(\s*data:image/", re.IGNORECASE)


def markdown_is_inert(text: str, link_schemes: Iterable[str]) -> bool:
    """Whether markdown can be shown as it is: no raw HTML, no fetches, web links only.

    JupyterLab renders a live output's markdown without sanitizing it, so raw
    HTML in it runs like HTML. Markdown without ``<`` cannot carry any; its
    links must use a web scheme (entities decoded, as the renderer decodes
    them), and each image must plainly be a ``data:`` one (a remote image is a
    fetch). Anything else is shown as text (see OutputPolicy).
    """
    if _MD_HTML.search(text):
        return False
    if text.count("![") != len(_MD_DATA_IMAGE.findall(text)):
        return False
    schemes = frozenset(s.lower() for s in link_schemes)
    for m in _MD_DEST.finditer(text):
        dest = m.group(1) if m.group(1) is not None else m.group(2)
        target = re.sub(r"[\x00-\x20]", "", html.unescape(dest))
        scheme = _SCHEME.match(target)
        if scheme is None:
            continue
        name = scheme.group(1).lower()
        if name not in schemes and not (name == "data" and target[5:].lower()
                                        .startswith("image/")):
            return False
    return True
