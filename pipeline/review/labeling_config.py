"""The Label Studio labeling config: its XML, the controls it declares, and tasks checked against it.

The config (https://labelstud.io/tags/) written by ``pipeline export labelstudio``: one ``Image``
(``name="image"``), ``RectangleLabels`` ``"label"``, optionally ``BrushLabels`` ``"brush"`` and
``PolygonLabels`` ``"polygon"``, all with the split's class names, and optionally a ``Header`` showing
the task's ``$review_reason``. Every result of a task names a control (``from_name``), the image
(``to_name``), a result type and labels; :func:`validate_tasks` checks all four against a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree as ET

from pipeline.core.errors import PipelineError

IMAGE_TAG = "image"
RECT_TAG = "label"
BRUSH_TAG = "brush"
POLY_TAG = "polygon"
REASON_FIELD = "review_reason"
PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
)
RESULT_KEYS = {"RectangleLabels": "rectanglelabels", "BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}


def labeling_config(
    class_names: list[str], *, brush: bool = False, polygons: bool = False, reason: bool = False
) -> str:
    """Label Studio labeling config XML: one image, rectangle labels and optionally brush/polygon labels.

    Args:
        class_names: label values, in category-id order (COCO id = index + 1).
        brush: add ``<BrushLabels name="brush">`` with the same labels.
        polygons: add ``<PolygonLabels name="polygon">`` with the same labels.
        reason: show the task's ``$review_reason`` (why it is in the review queue) above the image.
    """
    view = ET.Element("View")
    if reason:
        ET.SubElement(view, "Header", value=f"${REASON_FIELD}", size="5")
    ET.SubElement(view, "Image", name=IMAGE_TAG, value=f"${IMAGE_TAG}", zoom="true")
    controls = [("RectangleLabels", RECT_TAG)]
    if brush:
        controls.append(("BrushLabels", BRUSH_TAG))
    if polygons:
        controls.append(("PolygonLabels", POLY_TAG))
    for tag, name in controls:
        el = ET.SubElement(view, tag, name=name, toName=IMAGE_TAG)
        for i, n in enumerate(class_names):
            ET.SubElement(el, "Label", value=n, background=PALETTE[i % len(PALETTE)])
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


@dataclass(frozen=True)
class Control:
    """One labeling control of a config: its result type, image tag and label values (config order)."""

    kind: str  # "rectanglelabels" | "brushlabels" | "polygonlabels" | other "<tag>labels"
    to_name: str
    labels: tuple[str, ...]


def config_controls(config_xml: str, *, source: str = "labeling config") -> dict[str, Control]:
    """Control tags of a config (``*Labels`` elements): ``{name: Control}``, in document order.

    Raises:
        PipelineError: the config is not valid XML.
    """
    try:
        root = ET.fromstring(config_xml)
    except ET.ParseError as exc:
        raise PipelineError(f"{source}: labeling config is not valid XML ({exc})") from None
    out = {}
    for el in root.iter():
        if el.tag.endswith("Labels") and "name" in el.attrib:
            out[el.attrib["name"]] = Control(
                RESULT_KEYS.get(el.tag, el.tag.lower()),
                el.attrib.get("toName", ""),
                tuple(lab.attrib["value"] for lab in el.iter("Label")),
            )
    return out


def config_class_names(config_xml: str, *, source: str = "labeling config") -> list[str]:
    """Class names of a config: the label values of its controls, first appearance first."""
    names: list[str] = []
    for c in config_controls(config_xml, source=source).values():
        names += [n for n in c.labels if n not in names]
    return names


def validate_tasks(
    tasks: list[dict],
    config_xml: str,
    *,
    source: str = "tasks",
    groups: tuple[str, ...] = ("predictions", "annotations"),
) -> None:
    """Check every result's tag names, type and labels exist in the config and result ids are unique.

    Ids must be unique within each prediction or annotation (Label Studio copies a prediction's ids
    into the annotation made from it, so the same id may appear once in each).

    Raises:
        PipelineError: one line naming ``source``, the first offending task and result.
    """
    controls = config_controls(config_xml, source=source)
    for t, task in enumerate(tasks):
        for group in groups:
            for pred in task.get(group) or []:
                _check_results(pred.get("result") or [], controls, f"{source}: task {t}")


def _check_results(results: list[dict], controls: dict[str, Control], where: str) -> None:
    seen: set[str] = set()
    for r in results:
        if r.get("type") == "relation":
            continue
        rid = r.get("id")
        if rid in seen:
            raise PipelineError(f"{where} result id {rid!r} is not unique")
        seen.add(rid)
        if r.get("from_name") not in controls:
            raise PipelineError(f"{where} from_name {r.get('from_name')!r} not in the config {sorted(controls)}")
        ctl = controls[r["from_name"]]
        if r.get("to_name") != ctl.to_name:
            raise PipelineError(f"{where} to_name {r.get('to_name')!r} (config expects {ctl.to_name!r})")
        if r.get("type") != ctl.kind:
            raise PipelineError(
                f"{where} result type {r.get('type')!r} for {r['from_name']!r} (config expects {ctl.kind!r})"
            )
        for label in (r.get("value") or {}).get(ctl.kind, []):
            if label not in ctl.labels:
                raise PipelineError(f"{where} label {label!r} not in the config {sorted(ctl.labels)}")
