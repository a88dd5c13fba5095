// What list pages share: a title bar, filter controls kept in the URL, a virtual table, live refresh.
import { h, clear, table, errorBox } from '../ui.js';
import { setParams, live } from '../main.js';

// filters: [{name, label, type: 'select'|'text'|'checkbox', options}]
export function listPage(main, r, { title, intro, filters = [], columns, load, key, onRow, actions = [], name,
  liveTypes, liveRow, selectable = false, bulk }) {
  const values = {};
  for (const f of filters) values[f.name] = r.params.get(f.name) ?? (f.default ?? '');
  const status = h('p', { class: 'muted load-state', 'aria-live': 'polite' });
  const t = table(columns, { name: name || title.toLowerCase(), onRow, selectable });
  const controls = filters.map((f) => {
    const id = `flt-${f.name}`;
    let el;
    if (f.type === 'select') {
      el = h('select', { id }, f.options.map((o) => { const [v, l] = Array.isArray(o) ? o : [o, o || 'any'];
        return h('option', { value: v, selected: String(values[f.name]) === String(v) }, l); }));
    } else if (f.type === 'checkbox') {
      el = h('input', { id, type: 'checkbox', checked: values[f.name] === '1' || values[f.name] === true });
    } else {
      el = h('input', { id, type: 'text', value: values[f.name], placeholder: f.placeholder || '' });
    }
    const onChange = () => {
      values[f.name] = f.type === 'checkbox' ? (el.checked ? '1' : '') : el.value.trim();
      setParams(values);
      refresh();
    };
    el.addEventListener(f.type === 'text' ? 'change' : 'input', onChange);
    return h('div', { class: `filter ${f.type === 'checkbox' ? 'check' : ''}` }, h('label', { for: id }, f.label), el);
  });
  const bulkBar = bulk ? h('div', { class: 'bulk-bar', hidden: true }) : null;
  clear(main,
    h('div', { class: 'page-head' }, h('h1', {}, title), h('div', { class: 'page-actions' }, actions)),
    intro || null,
    filters.length ? h('form', { class: 'filters', 'aria-label': `${title} filters`, onsubmit: (e) => e.preventDefault() }, controls) : null,
    bulkBar, status, t.el);
  if (bulk) {
    t.el.addEventListener('selection', () => {
      const sel = t.selected();
      bulkBar.hidden = !sel.length;
      clear(bulkBar, h('span', {}, `${sel.length} selected`), bulk(sel, refresh));
    });
  }
  let seq = 0;
  async function refresh() {
    const mine = ++seq;
    status.textContent = 'Loading…';
    try {
      const rows = await load(values, (partial, more) => {
        if (mine !== seq) return;
        t.set(partial, key);
        status.textContent = more ? `Loading… ${partial.length.toLocaleString('en-US')} rows so far` : '';
      });
      if (mine !== seq) return;
      t.set(rows, key);
      if (bulk) t.clearSelection();
      status.textContent = rows.truncated ? `Showing the first ${rows.length.toLocaleString('en-US')} rows; narrow the filters to see the rest.` : '';
    } catch (e) {
      if (mine !== seq) return;
      status.replaceChildren(errorBox(e));
    }
  }
  refresh();
  // A live event either becomes a row at once (liveRow returns true when it matched the filters), or
  // refreshes the list at most once a second however fast events arrive.
  let pending = null;
  const onLive = (e) => {
    if (liveRow) { if (liveRow(e.detail, values)) t.prepend([e.detail], key); return; }
    if (liveTypes && !pending && liveTypes.some((p) => e.detail.event_type.startsWith(p))) {
      pending = setTimeout(() => { pending = null; refresh(); }, 1000);
    }
  };
  live.addEventListener('event', onLive);
  return { table: t, refresh, values, cleanup: () => { live.removeEventListener('event', onLive); clearTimeout(pending); } };
}

export function markTruncated(rows, more) { rows.truncated = more; return rows; }

export function amountOf(a) { return a ? Number(a.amount) : 0; }

export function scopeCell(scope) {
  return h('span', { class: 'scope', title: scope }, scope);
}
