// DOM helpers, formatting, the virtual table, dialogs and toasts. No framework: plain elements.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) { el.replaceChildren(); append(el, children); return el; }

export const fmt = {
  int(n) { return n === null || n === undefined ? '—' : Number(n).toLocaleString('en-US'); },
  amount(a) { return a ? `${fmt.int(a.amount)}` : '—'; },
  unit(u) { return { USD_MICROCENTS: 'µ¢ USD', TOKENS: 'tokens', CREDITS: 'credits', RISK_POINTS: 'risk pts' }[u] || u || ''; },
  time(t) {
    if (t === null || t === undefined || t === '') return '—';
    const d = typeof t === 'number' ? new Date(t) : new Date(t);
    return Number.isNaN(d.getTime()) ? String(t) : d.toISOString().replace('T', ' ').slice(0, 19) + 'Z';
  },
  ago(t) {
    const ms = Date.now() - (typeof t === 'number' ? t : Date.parse(t));
    if (Number.isNaN(ms)) return '—';
    const a = Math.abs(Math.round(ms / 1000));
    const text = a < 60 ? `${a}s` : a < 3600 ? `${Math.round(a / 60)}m` : a < 86400 ? `${Math.round(a / 3600)}h` : `${Math.round(a / 86400)}d`;
    return ms >= 0 ? `${text} ago` : `in ${text}`;
  },
  pct(x) { return x === null || x === undefined || !Number.isFinite(x) ? '—' : `${(x * 100).toFixed(1)}%`; },
};

export function badge(text, kind) {
  return h('span', { class: `badge ${kind || String(text).toLowerCase()}` }, text);
}

export function utilization(b) {
  const alloc = b.allocated ? b.allocated.amount : 0;
  if (!alloc) return null;
  return ((b.spent ? b.spent.amount : 0) + (b.debt ? b.debt.amount : 0)) / alloc;
}

export function bar(fraction) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const fill = h('span', { class: `bar-fill ${f >= 0.95 ? 'crit' : f >= 0.8 ? 'warn' : 'ok'}` });
  fill.style.width = `${(f * 100).toFixed(1)}%`;
  return h('span', { class: 'bar', role: 'img', 'aria-label': `utilization ${fmt.pct(fraction)}` }, fill);
}

// ---- toasts and dialogs ----
export function toast(message, kind = 'info') {
  let box = document.getElementById('toasts');
  if (!box) { box = h('div', { id: 'toasts', role: 'status', 'aria-live': 'polite' }); document.body.append(box); }
  const t = h('div', { class: `toast ${kind}` }, message);
  box.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
}

// A modal dialog. `build(close)` returns the body; resolves with whatever close() is given.
export function dialog(title, build, { wide = false } = {}) {
  return new Promise((resolve) => {
    const prev = document.activeElement;
    const dlg = h('dialog', { class: wide ? 'wide' : '', 'aria-label': title });
    const close = (value) => { dlg.close(); dlg.remove(); if (prev && prev.focus) prev.focus(); resolve(value); };
    dlg.addEventListener('cancel', (e) => { e.preventDefault(); close(null); });
    dlg.append(h('h2', {}, title), build(close));
    document.body.append(dlg);
    dlg.showModal();
    const first = dlg.querySelector('input:not([type=hidden]),select,textarea,button.primary');
    if (first) first.focus();
  });
}

export function confirmDialog(title, message, actionLabel, { danger = false } = {}) {
  return dialog(title, (close) => h('div', {},
    h('p', {}, message),
    h('div', { class: 'actions' },
      h('button', { type: 'button', onclick: () => close(false) }, 'Cancel'),
      h('button', { type: 'button', class: danger ? 'danger primary' : 'primary', onclick: () => close(true) }, actionLabel))));
}

// A form in a dialog: fields [{name,label,type,options,value,required,help}], submit(values) may throw to keep it open.
export function formDialog(title, fields, submitLabel, submit, { intro, wide } = {}) {
  return dialog(title, (close) => {
    const err = h('p', { class: 'form-error', role: 'alert' });
    const inputs = {};
    const form = h('form', { class: 'form', novalidate: true });
    if (intro) form.append(intro instanceof Node ? intro : h('p', {}, intro));
    for (const f of fields) {
      if (f.type === 'custom') { form.append(f.build(inputs)); continue; }
      const id = `f-${f.name}-${Math.random().toString(36).slice(2, 7)}`;
      let input;
      if (f.type === 'select') {
        input = h('select', { id, name: f.name }, f.options.map((o) => {
          const [v, l] = Array.isArray(o) ? o : [o, o];
          return h('option', { value: v, selected: String(f.value) === String(v) }, l);
        }));
      } else if (f.type === 'textarea') {
        input = h('textarea', { id, name: f.name, rows: 3 }, f.value || '');
      } else if (f.type === 'checkbox') {
        input = h('input', { id, name: f.name, type: 'checkbox', checked: !!f.value });
      } else {
        input = h('input', { id, name: f.name, type: f.type || 'text', value: f.value ?? '', required: !!f.required,
          placeholder: f.placeholder, min: f.min, step: f.step, autocomplete: 'off' });
      }
      if (f.onchange) input.addEventListener('input', () => f.onchange(input.value, inputs));
      inputs[f.name] = input;
      form.append(h('div', { class: `field ${f.type === 'checkbox' ? 'check' : ''}` },
        h('label', { for: id }, f.label), input, f.help ? h('small', {}, f.help) : null));
    }
    const btn = h('button', { type: 'submit', class: 'primary' }, submitLabel);
    form.append(err, h('div', { class: 'actions' },
      h('button', { type: 'button', onclick: () => close(null) }, 'Cancel'), btn));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const values = {};
      for (const [k, el] of Object.entries(inputs)) values[k] = el.type === 'checkbox' ? el.checked : el.value;
      btn.disabled = true;
      err.textContent = '';
      try {
        const result = await submit(values, inputs);
        close(result === undefined ? true : result);
      } catch (ex) {
        err.textContent = ex.message || String(ex);
        btn.disabled = false;
      }
    });
    return form;
  }, { wide });
}

// ---- export ----
export function download(name, text, type) {
  const a = h('a', { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 0);
}

function csvCell(v) {
  const s = v === null || v === undefined ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v);
  // a leading = + - @ would be a formula in a spreadsheet
  const safe = /^[=+\-@\t\r]/.test(s) ? `'${s}` : s;
  return /[",\n]/.test(safe) ? `"${safe.replace(/"/g, '""')}"` : safe;
}

export function toCSV(columns, rows) {
  const lines = [columns.map((c) => csvCell(c.label)).join(',')];
  for (const r of rows) lines.push(columns.map((c) => csvCell(c.export ? c.export(r) : c.value(r))).join(','));
  return lines.join('\n') + '\n';
}

// ---- the virtual table: only the visible rows are in the DOM, so 10,000 rows scroll and sort at once ----
const ROW_H = 36;

export function table(columns, { name = 'rows', onRow, empty = 'Nothing to show.', selectable = false, height } = {}) {
  let rows = [];
  let view = [];
  let sortCol = null;
  let sortDir = 1;
  let filterText = '';
  const selected = new Set();
  const rowKey = (r) => r.__key;
  const head = h('div', { class: 'vt-head', role: 'row' });
  const spacer = h('div', { class: 'vt-spacer' });
  const body = h('div', { class: 'vt-rows', role: 'rowgroup' });
  const scroller = h('div', { class: 'vt-scroll', tabindex: 0, 'aria-label': `${name} table` }, spacer, body);
  if (height) scroller.style.maxHeight = height;
  const count = h('span', { class: 'vt-count' });
  const search = h('input', { type: 'search', placeholder: 'Filter rows…', 'aria-label': `Filter ${name}` });
  const tools = h('div', { class: 'vt-tools' }, search, count,
    h('button', { type: 'button', class: 'small', onclick: () => download(`${name}.csv`, toCSV(columns, view), 'text/csv') }, 'Export CSV'),
    h('button', { type: 'button', class: 'small', onclick: () => download(`${name}.json`, JSON.stringify(view.map(strip), null, 2), 'application/json') }, 'Export JSON'));
  const inner = h('div', { class: 'vt-inner' }, head, scroller);
  const root = h('div', { class: 'vt', role: 'table', 'aria-label': name }, tools, h('div', { class: 'vt-x' }, inner));
  const template = columns.map((c) => c.width || 'minmax(90px, 1fr)').join(' ');
  // wide tables scroll sideways as a whole (header and rows together)
  inner.style.minWidth = `${columns.reduce((a, c) => a + (parseInt((c.width || '90').replace(/^minmax\(/, ''), 10) || 90) + 8, selectable ? 56 : 20)}px`;
  const gridCols = (selectable ? '36px ' : '') + template;
  head.style.gridTemplateColumns = gridCols;
  if (selectable) head.append(h('span', { role: 'columnheader' }, h('input', { type: 'checkbox', 'aria-label': 'Select all rows',
    onchange: (e) => { if (e.target.checked) view.forEach((r) => selected.add(rowKey(r))); else selected.clear(); render(true); root.dispatchEvent(new Event('selection')); } })));
  columns.forEach((c, i) => {
    const btn = h('button', { type: 'button', class: 'th', onclick: () => { if (sortCol === i) sortDir = -sortDir; else { sortCol = i; sortDir = 1; } apply(); } }, c.label);
    head.append(h('span', { role: 'columnheader' }, btn));
  });
  function strip(r) { const { __key, __text, ...rest } = r; return rest; }
  function apply() {
    const q = filterText.toLowerCase();
    view = q ? rows.filter((r) => r.__text.includes(q)) : rows.slice();
    if (sortCol !== null) {
      const c = columns[sortCol];
      const key = c.sort || c.value;
      view.sort((a, b) => { const x = key(a); const y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * sortDir; });
    }
    head.querySelectorAll('.th').forEach((b, i) => b.setAttribute('aria-sort', i === sortCol ? (sortDir > 0 ? 'ascending' : 'descending') : 'none'));
    count.textContent = `${view.length.toLocaleString('en-US')} of ${rows.length.toLocaleString('en-US')}`;
    spacer.style.height = `${view.length * ROW_H}px`;
    render(true);
  }
  let lastStart = -1;
  function render(force) {
    const top = scroller.scrollTop;
    const visible = Math.ceil((scroller.clientHeight || 600) / ROW_H) + 10;
    const start = Math.max(0, Math.floor(top / ROW_H) - 5);
    if (!force && start === lastStart) return;
    lastStart = start;
    const out = [];
    for (let i = start; i < Math.min(view.length, start + visible); i++) {
      const r = view[i];
      const tr = h('div', { class: 'vt-row', role: 'row', tabindex: onRow ? 0 : -1, dataset: { key: rowKey(r) } });
      tr.style.gridTemplateColumns = gridCols;
      tr.style.top = `${i * ROW_H}px`;
      if (selectable) tr.append(h('span', { role: 'cell' }, h('input', { type: 'checkbox', 'aria-label': 'Select row', checked: selected.has(rowKey(r)),
        onclick: (e) => e.stopPropagation(),
        onchange: (e) => { if (e.target.checked) selected.add(rowKey(r)); else selected.delete(rowKey(r)); root.dispatchEvent(new Event('selection')); } })));
      for (const c of columns) {
        const v = c.render ? c.render(r) : c.value(r);
        tr.append(h('span', { role: 'cell', class: c.class || '' }, v));
      }
      if (onRow) {
        tr.addEventListener('click', (e) => { if (!e.target.closest('button,a,input')) onRow(r); });
        tr.addEventListener('keydown', (e) => { if (e.key === 'Enter' && e.target === tr) onRow(r); });
      }
      out.push(tr);
    }
    body.replaceChildren(...out);
    if (!view.length) body.append(h('div', { class: 'vt-empty' }, rows.length ? 'No row matches the filter.' : empty));
  }
  scroller.addEventListener('scroll', () => requestAnimationFrame(() => render(false)), { passive: true });
  let timer = null;
  search.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(() => { filterText = search.value; apply(); }, 80); });
  return {
    el: root,
    set(newRows, keyFn) {
      rows = newRows.map((r, i) => {
        const o = Object.assign(Object.create(null), r);
        o.__key = keyFn ? keyFn(r) : String(i);
        o.__text = columns.map((c) => { const v = c.value(r); return v === null || v === undefined ? '' : String(v); }).join(' ').toLowerCase();
        return o;
      });
      apply();
    },
    // new rows on top (live events) without refetching; the filter and sort still apply
    prepend(newRows, keyFn) {
      const known = new Set(rows.map((r) => r.__key));
      const add = newRows.filter((r) => !known.has(keyFn(r))).map((r) => {
        const o = Object.assign(Object.create(null), r);
        o.__key = keyFn(r);
        o.__text = columns.map((c) => { const v = c.value(r); return v === null || v === undefined ? '' : String(v); }).join(' ').toLowerCase();
        return o;
      });
      if (!add.length) return;
      rows = add.concat(rows);
      apply();
    },
    get rows() { return view; },
    selected() { return rows.filter((r) => selected.has(rowKey(r))); },
    clearSelection() { selected.clear(); render(true); },
  };
}

// A plain small table (for cards and detail pages).
export function simpleTable(headers, rows) {
  return h('table', { class: 'simple' }, h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col' }, x)))),
    h('tbody', {}, rows.length ? rows.map((r) => h('tr', {}, r.map((c) => h('td', {}, c)))) :
      h('tr', {}, h('td', { colspan: headers.length, class: 'muted' }, 'None.'))));
}

export function errorBox(e) {
  return h('div', { class: 'error-box', role: 'alert' }, h('strong', {}, e.code || 'Error'), ' ', e.message || String(e));
}
