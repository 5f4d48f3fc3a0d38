"""The gallery page: one self-contained static HTML file (inline CSS and script, no server, no CDN),
images beside it under ``images/`` and plots under ``plots/``.

Rows are prompts, columns variants (base, each run's LoRA, ReNO); each cell holds the images of the
seeds with their scores under them, the best variant of a row (by the selected reward's mean over
seeds) is marked; rows sort by any reward of any variant; a click on an image enlarges it. The page
keeps its state in the address's fragment (``#sort=gold/score&by=base&dir=desc&view=IMAGE-ID``), so a
link opens the same view. Without script the page shows everything in prompt order.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field


@dataclass
class Cell:
    """The images of one (prompt, variant): (image id, relative path, seed, scores) each."""

    images: list[tuple[str, str, int, dict[str, float]]] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        keys = {k for _, _, _, s in self.images for k in s}
        return {k: sum(s[k] for _, _, _, s in self.images if k in s) / len(self.images) for k in sorted(keys)}


CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
.meta{color:#555;font-size:13px;margin:2px 0} code{font-size:12px;background:#f3f3f3;padding:1px 3px}
table{border-collapse:collapse} th,td{border:1px solid #ddd;padding:4px;vertical-align:top}
#summary td,#summary th{font-size:13px;text-align:right;padding:3px 8px} #summary th.v{text-align:left}
#summary td.top{font-weight:bold;background:#eaf6ea}
.controls{font-size:13px;margin:8px 0} .controls select{margin:0 8px 0 4px}
#gallery th.prompt{max-width:170px;text-align:left;font-size:13px;font-weight:normal}
#gallery thead th{font-size:13px;position:sticky;top:0;background:#fafafa}
td.cell{white-space:nowrap;position:relative;padding-top:15px} td.best{background:#eaf6ea;outline:2px solid #3a3}
td.best::before{content:"\\2605 best";position:absolute;top:1px;left:5px;font-size:11px;color:#272;font-weight:bold}
figure{display:inline-block;margin:0 3px 0 0;vertical-align:top;text-align:left}
figure img{width:var(--thumb);height:var(--thumb);object-fit:contain;cursor:zoom-in;display:block;border:1px solid #ccc}
img.px{image-rendering:pixelated}
figcaption{font-size:11px;line-height:13px;color:#333;width:var(--thumb);letter-spacing:-.2px}
figcaption .s{color:#777} figcaption .line{display:flex;gap:3px}
figcaption .k{flex:1 1 auto;min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;color:#666}
figcaption .score{flex:none}
#overlay{position:fixed;inset:0;background:rgba(0,0,0,.82);display:flex;flex-direction:column;
 align-items:center;justify-content:center;cursor:zoom-out}
#overlay[hidden]{display:none} #overlay img{width:min(80vh,90vw);height:min(80vh,90vw);object-fit:contain;background:#fff}
#overlay p{color:#fff;font-size:14px;max-width:90vw;text-align:center}
.plots img{max-width:820px;display:block;margin:6px 0;border:1px solid #eee}
#status{font-size:12px;color:#555}
"""

SCRIPT = """
(function(){
const data = JSON.parse(document.getElementById('gallery-data').textContent);
const tbody = document.querySelector('#gallery tbody');
const key = document.getElementById('sort-key'), by = document.getElementById('sort-by'),
      dir = document.getElementById('sort-dir');
const overlay = document.getElementById('overlay');
function params(){ return new URLSearchParams(location.hash.slice(1)); }
function setParams(p){ const h = p.toString(); history.replaceState(null, '', h ? '#' + h : location.pathname);
  apply(); }
function means(row, variant){ const td = row.querySelector('td[data-variant="' + variant + '"]');
  return td ? JSON.parse(td.dataset.means) : {}; }
function markBest(k){
  for (const row of tbody.rows){
    let best = null, value = -Infinity;
    for (const td of row.querySelectorAll('td.cell')){
      td.classList.remove('best'); const m = JSON.parse(td.dataset.means);
      if (k in m && m[k] > value){ value = m[k]; best = td; } }
    if (best) best.classList.add('best'); } }
function apply(){
  const p = params();
  const k = p.get('sort') || data.default_key;
  if ([...key.options].some(o => o.value === k)) key.value = k;
  if (p.get('by') && [...by.options].some(o => o.value === p.get('by'))) by.value = p.get('by');
  if (p.get('dir') === 'asc' || p.get('dir') === 'desc') dir.value = p.get('dir');
  const rows = [...tbody.rows];
  if (key.value === '') rows.sort((a, b) => a.dataset.index - b.dataset.index);
  else { const sign = dir.value === 'asc' ? 1 : -1;
    rows.sort((a, b) => { const x = means(a, by.value)[key.value], y = means(b, by.value)[key.value];
      return sign * ((x ?? -Infinity) - (y ?? -Infinity)) || a.dataset.index - b.dataset.index; }); }
  rows.forEach(r => tbody.appendChild(r));
  document.body.dataset.sortKey = key.value; document.body.dataset.sortBy = by.value;
  document.body.dataset.sortDir = dir.value;
  markBest(key.value || data.default_key);
  const view = p.get('view'), img = view && document.getElementById(view);
  if (img){ document.getElementById('overlay-img').src = img.getAttribute('src');
    document.getElementById('overlay-caption').textContent = img.alt + ' | ' + img.dataset.caption;
    overlay.hidden = false; overlay.dataset.view = view; }
  else { overlay.hidden = true; delete overlay.dataset.view; } }
for (const el of [key, by, dir]) el.addEventListener('change', () => { const p = params();
  p.set('sort', key.value); p.set('by', by.value); p.set('dir', dir.value); setParams(p); });
document.querySelectorAll('#gallery img').forEach(img => img.addEventListener('click', () => {
  const p = params(); p.set('view', img.id); setParams(p); }));
overlay.addEventListener('click', () => { const p = params(); p.delete('view'); setParams(p); });
document.addEventListener('keydown', e => { if (e.key === 'Escape' && !overlay.hidden){
  const p = params(); p.delete('view'); setParams(p); } });
window.addEventListener('hashchange', apply);
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('#gallery img')];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  const status = document.getElementById('status');
  status.dataset.loaded = imgs.length - broken.length; status.dataset.broken = broken.length;
  status.textContent = (imgs.length - broken.length) + ' of ' + imgs.length + ' images loaded' +
    (broken.length ? '; missing: ' + broken.slice(0, 5).map(i => i.getAttribute('src')).join(', ') : '');
  document.body.dataset.ready = '1'; });
apply();
})();
"""


BLANK = "data:image/gif;base64,R0lGODlhAQABAAAAACw="  # the enlarged view's image until one is clicked


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def render(
    *,
    title: str,
    meta: list[str],
    variants: list[tuple[str, str]],
    prompts: list[str],
    cells: dict[tuple[int, str], Cell],
    score_names: list[str],
    summary: dict[str, dict[str, tuple[float, float]]],
    plots: list[tuple[str, str]],
    default_key: str,
    thumb: int = 112,
    pixelated: bool = True,
) -> str:
    """The page. ``variants``: (id, label) in column order; ``cells[(prompt index, variant id)]``;
    ``summary[variant][score]`` = (mean, spread over seeds); ``plots``: (relative path, title)."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        f'<body style="--thumb:{int(thumb)}px">',
        f"<h1>{e(title)}</h1>",
    ]
    out += [f'<p class="meta">{m}</p>' for m in meta]  # meta lines are escaped by the caller
    out.append('<p id="status">images not checked yet (script off?)</p>')
    # summary
    out.append("<h2>Mean scores per variant (± spread over seeds)</h2>")
    out.append('<table id="summary"><thead><tr><th class="v">variant</th>')
    out += [f'<th data-score="{e(k)}">{e(k)}</th>' for k in score_names]
    out.append("</tr></thead><tbody>")
    tops = {k: max((summary[v][k][0] for v, _ in variants if k in summary[v]), default=None) for k in score_names}
    for vid, label in variants:
        out.append(f'<tr data-variant="{e(vid)}"><th class="v">{e(label)}</th>')
        for k in score_names:
            if k in summary[vid]:
                mean, spread = summary[vid][k]
                top = ' class="top"' if tops[k] is not None and mean == tops[k] else ""
                out.append(f'<td{top} data-mean="{mean:.6g}">{_fmt(mean)} ± {_fmt(spread)}</td>')
            else:
                out.append("<td>–</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    out.append(
        '<p class="meta">spread: standard deviation over seeds of the mean over prompts; '
        "bold: the best variant of each column. Higher is better for every score.</p>"
    )
    # controls
    out.append('<h2>Images</h2><div class="controls"><label>sort rows by <select id="sort-key">')
    out.append('<option value="">prompt order</option>')
    out += [f'<option value="{e(k)}"{" selected" if k == default_key else ""}>{e(k)}</option>' for k in score_names]
    out.append('</select></label><label>of <select id="sort-by">')
    out += [f'<option value="{e(v)}">{e(label)}</option>' for v, label in variants]
    out.append('</select></label><label>order <select id="sort-dir">')
    out.append('<option value="desc" selected>highest first</option><option value="asc">lowest first</option>')
    out.append("</select></label> ★ marks the best variant of each row by the sort score; click an image to enlarge.")
    out.append("</div>")
    # the table
    out.append('<table id="gallery"><thead><tr><th>prompt</th>')
    out += [f'<th data-variant="{e(v)}">{e(label)}</th>' for v, label in variants]
    out.append("</tr></thead><tbody>")
    px = ' class="px"' if pixelated else ""
    for i, prompt in enumerate(prompts):
        row_means = {v: cells[(i, v)].means() for v, _ in variants if (i, v) in cells}
        best = max(
            (v for v in row_means if default_key in row_means[v]), key=lambda v: row_means[v][default_key], default=None
        )
        out.append(f'<tr class="row" data-index="{i}"><th class="prompt">{e(prompt)}</th>')
        for vid, label in variants:
            cell = cells.get((i, vid))
            if cell is None:
                out.append(f'<td class="cell" data-variant="{e(vid)}" data-means="{{}}"></td>')
                continue
            cls = "cell best" if vid == best else "cell"
            means = e(json.dumps(row_means[vid]))
            out.append(f'<td class="{cls}" data-variant="{e(vid)}" data-means="{means}">')
            for image_id, src, seed, scores in cell.images:
                caption = ", ".join(f"{k} {_fmt(v)}" for k, v in scores.items())
                alt = f"{label}, seed {seed}: {prompt}"
                out.append(
                    f'<figure><img{px} id="{e(image_id)}" src="{e(src)}" alt="{e(alt)}" '
                    f'data-caption="{e(caption)}" data-scores="{e(json.dumps(scores))}" loading="eager">'
                )
                lines = "".join(
                    f'<span class="line"><span class="k" title="{e(k)}">{e(k)}</span>'
                    f'<span class="score" data-score="{e(k)}">{_fmt(v)}</span></span>'
                    for k, v in scores.items()
                )
                out.append(f'<figcaption><span class="s">seed {seed}</span>{lines}</figcaption></figure>')
            out.append("</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if plots:
        out.append('<h2>Training curves</h2><div class="plots">')
        for src, caption in plots:
            out.append(f'<a href="{e(src)}"><img src="{e(src)}" alt="{e(caption)}"></a>')
        out.append("</div>")
    out.append(
        f'<div id="overlay" hidden><img id="overlay-img" src="{BLANK}" alt="enlarged image"><p id="overlay-caption"></p></div>'
    )
    data = {"default_key": default_key, "variants": [v for v, _ in variants], "scores": score_names}
    payload = json.dumps(data).replace("</", "<\\/")
    out.append(f'<script type="application/json" id="gallery-data">{payload}</script>')
    out.append(f"<script>{SCRIPT}</script>")
    out.append("</body>")
    out.append("</html>")
    return "\n".join(out) + "\n"
