// A small SVG chart layer: line/area over time, donuts and horizontal bars. Colours come from CSS
// variables, so dark mode needs nothing here.
const NS = 'http://www.w3.org/2000/svg';

function s(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

const PALETTE = ['--c1', '--c2', '--c3', '--c4', '--c5', '--c6', '--c7', '--c8'];
export const color = (i) => `var(${PALETTE[i % PALETTE.length]})`;

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function short(n) {
  const a = Math.abs(n);
  if (a >= 1e12) return `${(n / 1e12).toFixed(1)}T`;
  if (a >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${(n / 1e3).toFixed(0)}k`;
  return String(Math.round(n));
}

// points: [{t: ms, v: number}]; opts: {cumulative, limit (budget line), projection: {t, v} end point, label}
export function lineChart(points, opts = {}) {
  const W = 720, H = 260, L = 56, R = 16, T = 16, B = 32;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart line', role: 'img', 'aria-label': opts.label || 'spend over time' });
  if (!points.length) { svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'muted' }, 'No data')); return svg; }
  const t0 = points[0].t;
  const t1 = Math.max(points[points.length - 1].t, opts.projection ? opts.projection.t : 0);
  // at least 4 so the 5 grid lines fall on whole numbers (counts, small amounts)
  let vmax = Math.max(4, niceMax(Math.max(...points.map((p) => p.v), opts.limit || 0, opts.projection ? opts.projection.v : 0)));
  if (vmax < 20) vmax = Math.ceil(vmax / 4) * 4; // small counts: whole-number grid lines (not 1.25, 2.5)
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
  const y = (v) => H - B - (v / vmax) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = (vmax * i) / 4;
    svg.append(s('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }),
      s('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'axis' }, short(v)));
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + ((t1 - t0) * i) / 4;
    const d = new Date(t);
    const span = t1 - t0;
    const iso = d.toISOString();
    const lab = span > 4 * 86400000 ? iso.slice(5, 10) : span > 20 * 3600000 ? `${iso.slice(5, 10)} ${iso.slice(11, 16)}` : iso.slice(11, 16);
    svg.append(s('text', { x: x(t), y: H - 10, 'text-anchor': 'middle', class: 'axis' }, lab));
  }
  const path = points.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(' ');
  svg.append(s('path', { d: `${path} L${x(points[points.length - 1].t).toFixed(1)},${y(0)} L${x(t0)},${y(0)} Z`, class: 'area' }));
  svg.append(s('path', { d: path, class: 'stroke', 'data-series': 'spend' }));
  if (opts.limit) {
    svg.append(s('line', { x1: L, x2: W - R, y1: y(opts.limit), y2: y(opts.limit), class: 'limit' }),
      s('text', { x: W - R, y: y(opts.limit) - 4, 'text-anchor': 'end', class: 'axis limit-label' }, 'budget'));
  }
  if (opts.projection) {
    const last = points[points.length - 1];
    svg.append(s('line', { x1: x(last.t), y1: y(last.v), x2: x(opts.projection.t), y2: y(opts.projection.v), class: 'projection' }));
  }
  // invisible hit targets carrying exact values (tooltips and tests read them)
  for (const p of points) {
    svg.append(s('circle', { cx: x(p.t), cy: y(p.v), r: 3, class: 'pt', 'data-t': p.t, 'data-v': p.v },
      s('title', {}, `${new Date(p.t).toISOString().slice(0, 16).replace('T', ' ')}Z: ${p.v.toLocaleString('en-US')}`)));
  }
  return svg;
}

// segments: [{label, value, onClick}]
export function donut(segments, { label = 'breakdown', size = 150 } = {}) {
  const total = segments.reduce((a, x) => a + x.value, 0);
  const wrap = document.createElement('div');
  wrap.className = 'donut';
  const r = 52, c = 2 * Math.PI * r;
  const svg = s('svg', { viewBox: '0 0 140 140', width: size, height: size, role: 'img', 'aria-label': `${label}: ${segments.map((x) => `${x.label} ${x.value}`).join(', ')}` });
  svg.append(s('circle', { cx: 70, cy: 70, r, class: 'donut-bg' }));
  let off = 0;
  segments.forEach((seg, i) => {
    if (!seg.value) return;
    const len = (seg.value / Math.max(1, total)) * c;
    const arc = s('circle', { cx: 70, cy: 70, r, class: 'donut-seg',
      'stroke-dasharray': `${len} ${c - len}`, 'stroke-dashoffset': -off, transform: 'rotate(-90 70 70)' },
    s('title', {}, `${seg.label}: ${seg.value}`));
    arc.style.stroke = seg.color || color(i);
    if (seg.onClick) arc.addEventListener('click', seg.onClick);
    svg.append(arc);
    off += len;
  });
  svg.append(s('text', { x: 70, y: 76, 'text-anchor': 'middle', class: 'donut-total' }, short(total)));
  wrap.append(svg);
  const legend = document.createElement('ul');
  legend.className = 'legend';
  segments.forEach((seg, i) => {
    const li = document.createElement('li');
    const sw = document.createElement('span');
    sw.className = 'swatch';
    sw.style.background = seg.color || color(i);
    const content = seg.onClick ? document.createElement('button') : document.createElement('span');
    if (seg.onClick) { content.type = 'button'; content.className = 'link'; content.addEventListener('click', seg.onClick); }
    content.textContent = `${seg.label}: ${seg.value.toLocaleString('en-US')}`;
    li.append(sw, content);
    legend.append(li);
  });
  wrap.append(legend);
  return wrap;
}

// groups: [{key, value}] as horizontal bars
export function hbars(groups, { label = 'breakdown', format = (v) => v.toLocaleString('en-US') } = {}) {
  const max = Math.max(1, ...groups.map((g) => g.value));
  const ul = document.createElement('ul');
  ul.className = 'hbars';
  ul.setAttribute('aria-label', label);
  groups.forEach((g, i) => {
    const li = document.createElement('li');
    const name = document.createElement('span');
    name.className = 'hb-key';
    name.textContent = g.key;
    const track = document.createElement('span');
    track.className = 'hb-track';
    const fill = document.createElement('span');
    fill.className = 'hb-fill';
    fill.style.width = `${((g.value / max) * 100).toFixed(1)}%`;
    fill.style.background = color(i);
    track.append(fill);
    const val = document.createElement('span');
    val.className = 'hb-val';
    val.textContent = format(g.value);
    li.append(name, track, val);
    ul.append(li);
  });
  if (!groups.length) { const li = document.createElement('li'); li.className = 'muted'; li.textContent = 'No data in this window.'; ul.append(li); }
  return ul;
}
