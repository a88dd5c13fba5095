import { get, getAll, session } from '../api.js';
import { h, clear, fmt, errorBox, simpleTable, download, toCSV } from '../ui.js';
import { lineChart, hbars } from '../chart.js';
import { go, live } from '../main.js';
import { UNITS } from './budgets.js';

export const WINDOWS = [['3600', 'last hour'], ['21600', 'last 6 hours'], ['86400', 'last 24 hours'], ['604800', 'last 7 days'], ['2592000', 'last 30 days']];
const GROUPS = [['agent', 'Agent'], ['workflow', 'Workflow'], ['action_kind', 'Action kind'], ['action_name', 'Action name (model/tool)']];

function usagePath() { return session.isAdmin ? '/v1/admin/usage' : '/v1/usage'; }

// spend over time for one tenant (and optionally one scope + unit), with budget line and projection
export async function spendPanel(box, { tenant, scope, unit, window = '86400' }) {
  const now = Date.now();
  const from = new Date(now - Number(window) * 1000).toISOString();
  const base = { tenant_id: session.isAdmin ? tenant : undefined, scope_prefix: scope || undefined, unit: unit || undefined, from };
  const [usage, ...groups] = await Promise.all([get(usagePath(), base), ...GROUPS.map(([g]) => get(usagePath(), { ...base, group_by: g }))]);
  let budget = null;
  if (scope && unit) {
    try { budget = await get('/v1/admin/budgets/lookup', { scope, unit }); } catch (e) { budget = null; }
  }
  const content = [];
  if (!usage.units.length) content.push(h('p', { class: 'muted', id: 'no-spend' }, 'No committed spend in this window.'));
  for (const u of usage.units) {
    // With a budget: its spent level over time (spent now minus what was committed after each point).
    // Without: cumulative spend within the window.
    let acc = 0;
    const cumulative = u.series.map((p) => { acc += p.amount; return { t: p.start_ms + usage.bucket_seconds * 1000, v: acc }; });
    let points = cumulative;
    let limit = null;
    let projection = null;
    let exhaustion = null;
    if (budget && budget.unit === u.unit) {
      const spentNow = (budget.spent ? budget.spent.amount : 0) + (budget.debt ? budget.debt.amount : 0);
      points = cumulative.map((p) => ({ t: p.t, v: Math.max(0, spentNow - (u.total - p.v)) }));
      limit = budget.allocated.amount;
      const windowMs = Number(window) * 1000;
      const rate = u.total / windowMs; // per ms over the window
      const remaining = budget.remaining ? budget.remaining.amount : 0;
      if (rate > 0 && remaining > 0) {
        const eta = now + remaining / rate;
        exhaustion = eta;
        projection = { t: Math.min(eta, now + windowMs), v: Math.min(limit, spentNow + rate * Math.min(eta - now, windowMs)) };
      }
    }
    const groupCards = groups.map((g, i) => {
      const gu = g.units.find((x) => x.unit === u.unit);
      return h('section', { class: 'card' }, h('h3', {}, `By ${GROUPS[i][1].toLowerCase()}`),
        hbars(gu ? gu.groups.map((x) => ({ key: x.key, value: x.amount })) : [], { label: `spend by ${GROUPS[i][0]}` }));
    });
    content.push(h('section', { class: 'card wide spend-unit', dataset: { unit: u.unit, total: u.total } },
      h('h2', {}, `${fmt.unit(u.unit)}: ${fmt.int(u.total)} committed in ${u.count - (u.events || 0)} reservation(s)${u.events ? ` and ${u.events} posted event(s)` : ''}`),
      budget && budget.unit === u.unit ? h('p', { class: 'muted' }, `Budget ${budget.scope}: allocated ${fmt.int(limit)}, remaining ${fmt.int(budget.remaining.amount)}. `,
        h('strong', { id: 'exhaustion' }, exhaustion ? `At this window's rate it is exhausted around ${fmt.time(exhaustion)}.` : 'No exhaustion projected at the current rate.')) : null,
      lineChart(points, { limit, projection, label: `spend over time in ${u.unit}` }),
      h('div', { class: 'row-actions' },
        h('button', { type: 'button', class: 'small', onclick: () => download(`spend-${u.unit}.csv`, toCSV([{ label: 'bucket_start', value: (p) => p.start }, { label: 'amount', value: (p) => p.amount }, { label: 'count', value: (p) => p.count }], u.series), 'text/csv') }, 'Export CSV'),
        h('button', { type: 'button', class: 'small', onclick: () => download(`spend-${u.unit}.json`, JSON.stringify(u, null, 2), 'application/json') }, 'Export JSON')),
      h('div', { class: 'cards' }, groupCards)));
  }
  if (usage.truncated) content.push(h('p', { class: 'warn-text' }, `Only the newest ${usage.scanned} reservations were counted; narrow the window.`));
  box.replaceChildren(...content);
}

export async function render(main, r) {
  const p = r.params;
  const v = { tenant: session.isAdmin ? (p.get('tenant') || '') : session.tenant, scope: p.get('scope') || '', unit: p.get('unit') || '', window: p.get('window') || '86400' };
  const tenantIn = h('input', { id: 'spend-tenant', value: v.tenant });
  const scopeIn = h('input', { id: 'spend-scope', value: v.scope, placeholder: 'tenant:acme/workspace:eng' });
  const unitSel = h('select', { id: 'spend-unit' }, ['', ...UNITS].map((u) => h('option', { value: u, selected: u === v.unit }, u || 'any')));
  const winSel = h('select', { id: 'spend-window' }, WINDOWS.map(([k, l]) => h('option', { value: k, selected: k === v.window }, l)));
  const box = h('div', { id: 'spend-box' }, h('p', { class: 'muted' }, 'Loading…'));
  const apply = () => go('spend', { tenant: session.isAdmin ? tenantIn.value.trim() : '', scope: scopeIn.value.trim(), unit: unitSel.value, window: winSel.value });
  clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'Spend over time')),
    h('form', { class: 'filters', 'aria-label': 'Spend filters', onsubmit: (e) => { e.preventDefault(); apply(); } },
      session.isAdmin ? h('div', { class: 'filter' }, h('label', { for: 'spend-tenant' }, 'Tenant'), tenantIn) : null,
      h('div', { class: 'filter' }, h('label', { for: 'spend-scope' }, 'Scope (optional)'), scopeIn),
      h('div', { class: 'filter' }, h('label', { for: 'spend-unit' }, 'Unit'), unitSel),
      h('div', { class: 'filter' }, h('label', { for: 'spend-window' }, 'Window'), winSel),
      h('button', { type: 'submit' }, 'Show')), box);
  for (const el of [unitSel, winSel]) el.addEventListener('change', apply);
  if (!v.tenant) {
    const { rows } = await getAll('/v1/admin/tenants', {}, 'tenants', { max: 200 });
    box.replaceChildren(h('p', {}, 'Choose a tenant: '), h('ul', { class: 'inline' }, rows.filter((t) => t.status !== 'CLOSED').map((t) =>
      h('li', {}, h('a', { href: `#/spend?tenant=${encodeURIComponent(t.tenant_id)}` }, t.tenant_id)))));
    return;
  }
  const load = () => spendPanel(box, v).catch((e) => box.replaceChildren(errorBox(e)));
  await load();
  let t = null;
  const onLive = (e) => { if (e.detail.tenant_id === v.tenant && /^(reservation|budget)\./.test(e.detail.event_type)) { clearTimeout(t); t = setTimeout(load, 500); } };
  live.addEventListener('event', onLive);
  return () => { live.removeEventListener('event', onLive); clearTimeout(t); };
}

export async function renderDenials(main, r) {
  const p = r.params;
  const tenant = session.isAdmin ? (p.get('tenant') || '') : session.tenant;
  const window = p.get('window') || '86400';
  const tenantIn = h('input', { id: 'den-tenant', value: tenant, placeholder: 'all tenants' });
  const winSel = h('select', { id: 'den-window' }, WINDOWS.map(([k, l]) => h('option', { value: k, selected: k === window }, l)));
  const box = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const apply = () => go('denials', { tenant: session.isAdmin ? tenantIn.value.trim() : '', window: winSel.value });
  winSel.addEventListener('change', apply);
  clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'Denials')),
    h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); apply(); } },
      session.isAdmin ? h('div', { class: 'filter' }, h('label', { for: 'den-tenant' }, 'Tenant'), tenantIn) : null,
      h('div', { class: 'filter' }, h('label', { for: 'den-window' }, 'Window'), winSel), h('button', { type: 'submit' }, 'Show')), box);
  try {
    const d = await get(session.isAdmin ? '/v1/admin/denials' : '/v1/denials', { tenant_id: session.isAdmin && tenant ? tenant : undefined,
      from: new Date(Date.now() - Number(window) * 1000).toISOString() });
    let acc = 0;
    const pts = (d.series || []).map((x) => ({ t: x.start_ms, v: x.count }));
    box.replaceChildren(
      h('p', { id: 'denial-total' }, `${fmt.int(d.total)} denied reservation(s) in the window.`),
      h('section', { class: 'card wide' }, h('h2', {}, 'Denials per bucket'), lineChart(pts, { label: 'denials over time' })),
      h('div', { class: 'cards' },
        h('section', { class: 'card' }, h('h3', {}, 'By reason'), hbars((d.by_reason || []).map((x) => ({ key: x.key, value: x.count })), { label: 'denials by reason' })),
        h('section', { class: 'card' }, h('h3', {}, 'Top blocked agents'), hbars((d.by_agent || []).map((x) => ({ key: x.key, value: x.count })), { label: 'denials by agent' })),
        h('section', { class: 'card' }, h('h3', {}, 'Top blocked tools/models'), hbars((d.by_tool || []).map((x) => ({ key: x.key, value: x.count })), { label: 'denials by tool' })),
        h('section', { class: 'card' }, h('h3', {}, 'By scope'), simpleTable(['Scope', 'Denials'], (d.by_scope || []).map((x) => [x.key, String(x.count)])))));
    void acc;
  } catch (e) { box.replaceChildren(errorBox(e)); }
}
