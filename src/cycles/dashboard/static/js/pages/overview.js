import { get, getAll, session } from '../api.js';
import { h, clear, fmt, badge, bar, utilization, simpleTable, errorBox } from '../ui.js';
import { donut } from '../chart.js';
import { go, live } from '../main.js';
import { expiringSoon } from './lists.js';

const BANDS = [['0-0.5', 'below 50%'], ['0.5-0.8', '50–80%'], ['0.8-0.95', '80–95%'], ['0.95-1', '95–100%'], ['1-', '100% and over']];

function band(u) {
  if (u === null) return null;
  if (u >= 1) return '1-';
  if (u >= 0.95) return '0.95-1';
  if (u >= 0.8) return '0.8-0.95';
  if (u >= 0.5) return '0.5-0.8';
  return '0-0.5';
}

export async function render(main) {
  let ov, budgets, keys, auditRows;
  try {
    [ov, budgets, keys, auditRows] = await Promise.all([
      get('/v1/admin/overview'),
      getAll('/v1/admin/budgets', {}, 'ledgers', { max: 2000 }).then((x) => x.rows),
      session.can('view_api_keys') ? getAll('/v1/admin/api-keys', { status: 'ACTIVE' }, 'keys', { max: 2000 }).then((x) => x.rows) : [],
      session.can('view_audit') ? get('/v1/admin/audit/logs', { tenant_id: '__admin__', limit: 8 }).then((x) => x.logs) : [],
    ]);
  } catch (e) { clear(main, errorBox(e)); return; }
  // CLOSED budgets are history: they count in no utilization figure
  const open = budgets.filter((b) => b.status !== 'CLOSED');
  const bands = {};
  for (const b of open) { const k = band(utilization(b)); if (k) bands[k] = (bands[k] || 0) + 1; }
  const nearCap = open.filter((b) => (utilization(b) ?? 0) >= 0.8).sort((a, b) => utilization(b) - utilization(a)).slice(0, 8);
  const frozen = open.filter((b) => b.status === 'FROZEN');
  const expiring = keys.filter(expiringSoon);
  const bc = ov.budget_counts;
  const failing = ov.failing_webhooks || [];
  const denialReasons = {};
  for (const d of ov.recent_denials || []) { const r = (d.data && d.data.reason_code) || 'unknown'; denialReasons[r] = (denialReasons[r] || 0) + 1; }

  const alerts = [];
  if (bc.over_limit) alerts.push(h('a', { href: '#/budgets?over_limit=1' }, `${bc.over_limit} budget(s) over limit`));
  if (bc.with_debt) alerts.push(h('a', { href: '#/budgets?has_debt=1' }, `${bc.with_debt} in debt`));
  if (bc.frozen) alerts.push(h('a', { href: '#/budgets?status=FROZEN' }, `${bc.frozen} frozen`));
  if (failing.length) alerts.push(h('a', { href: '#/webhooks?failing=1' }, `${failing.length} failing webhook(s)`));
  if (expiring.length) alerts.push(h('a', { href: '#/keys?status=ACTIVE' }, `${expiring.length} key(s) expiring within 7 days`));
  const recentDenials = (ov.recent_denials || []).length;
  if (recentDenials) alerts.push(h('a', { href: '#/denials' }, `${recentDenials} recent denial(s)`));

  const totals = [['Tenants', ov.tenant_counts.active, `${ov.tenant_counts.suspended} suspended`, '#/tenants'],
    ['Budgets', bc.active + bc.frozen, `${bc.frozen} frozen`, '#/budgets'],
    ['Over limit', bc.over_limit, 'budgets', '#/budgets?over_limit=1'],
    ['In debt', bc.with_debt, 'budgets', '#/budgets?has_debt=1'],
    ['Webhooks', ov.webhook_counts.active, `${ov.webhook_counts.with_failures} failing`, '#/webhooks'],
    ['Events', ov.event_counts.total_recent, `last ${Math.round(ov.event_window_seconds / 60)} min`, '#/events']];

  const eventsList = h('ul', { class: 'feed', id: 'live-feed' });
  const onLive = (e) => {
    const ev = e.detail;
    eventsList.prepend(h('li', {}, h('span', { class: `etype ${ev.category}` }, ev.event_type), ' ', h('span', { class: 'scope' }, ev.scope || ev.tenant_id), ' ', h('small', { class: 'muted' }, fmt.time(ev.timestamp))));
    while (eventsList.children.length > 12) eventsList.lastChild.remove();
  };
  live.addEventListener('event', onLive);

  clear(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Overview'), h('span', { class: 'muted' }, `as of ${fmt.time(ov.as_of)}`)),
    h('div', { class: `headline ${alerts.length ? 'alert' : 'calm'}`, role: 'status', id: 'headline' },
      alerts.length ? [h('strong', {}, 'Needs attention: '), alerts.flatMap((a, i) => (i ? [' · ', a] : [a]))] : 'All clear: nothing over limit, in debt, frozen or failing.'),
    h('div', { class: 'totals' }, totals.map(([k, v, sub, href]) => h('a', { class: 'total', href }, h('span', { class: 'total-v' }, fmt.int(v)), h('span', { class: 'total-k' }, k), h('small', {}, sub)))),
    h('div', { class: 'cards' },
      h('section', { class: 'card' }, h('h2', {}, 'Budget status'), donut([
        { label: 'ACTIVE', value: bc.active, onClick: () => go('budgets', { status: 'ACTIVE' }), color: 'var(--ok)' },
        { label: 'FROZEN', value: bc.frozen, onClick: () => go('budgets', { status: 'FROZEN' }), color: 'var(--warn)' },
        { label: 'CLOSED', value: bc.closed, onClick: () => go('budgets', { status: 'CLOSED' }), color: 'var(--muted)' }], { label: 'budget status' })),
      h('section', { class: 'card' }, h('h2', {}, 'Utilization (open budgets)'), donut(BANDS.map(([k, l], i) => ({ label: l, value: bands[k] || 0,
        onClick: () => go('budgets', { band: k }), color: ['var(--c2)', 'var(--c1)', 'var(--warn)', 'var(--crit)', 'var(--crit2)'][i] })), { label: 'utilization bands' })),
      h('section', { class: 'card' }, h('h2', {}, 'Events by category'), donut(Object.entries(ov.event_counts.by_category || {}).map(([k, v]) => ({ label: k, value: v, onClick: () => go('events', { category: k }) })), { label: 'events by category' })),
      h('section', { class: 'card' }, h('h2', {}, 'Webhook health'), donut([
        { label: 'healthy', value: Math.max(0, ov.webhook_counts.active - ov.webhook_counts.with_failures), onClick: () => go('webhooks', { status: 'ACTIVE' }), color: 'var(--ok)' },
        { label: 'failing', value: ov.webhook_counts.with_failures, onClick: () => go('webhooks', { failing: '1' }), color: 'var(--crit)' },
        { label: 'disabled', value: ov.webhook_counts.disabled, onClick: () => go('webhooks', { status: 'DISABLED' }), color: 'var(--muted)' }], { label: 'webhook health' }))),
    h('h2', {}, 'Needs attention'),
    h('div', { class: 'cards' },
      h('section', { class: 'card' }, h('h3', {}, 'Budgets near cap'), simpleTable(['Scope', 'Utilization'], nearCap.map((b) => [h('a', { href: `#/budgets?scope_prefix=${encodeURIComponent(b.scope)}` }, b.scope), h('span', { class: 'util' }, bar(utilization(b)), fmt.pct(utilization(b)))]))),
      h('section', { class: 'card' }, h('h3', {}, 'In debt'), simpleTable(['Scope', 'Debt'], (ov.debt_scopes || []).map((d) => [h('a', { href: `#/budgets?has_debt=1&scope_prefix=${encodeURIComponent(d.scope)}` }, d.scope), fmt.int(d.debt)]))),
      h('section', { class: 'card' }, h('h3', {}, 'Frozen'), simpleTable(['Scope', 'Unit'], frozen.slice(0, 8).map((b) => [b.scope, b.unit]))),
      h('section', { class: 'card' }, h('h3', {}, 'Failing webhooks'), simpleTable(['Subscription', 'Failures'], failing.map((f) => [h('a', { href: `#/webhook/${encodeURIComponent(f.subscription_id)}` }, f.subscription_id), String(f.consecutive_failures)]))),
      h('section', { class: 'card' }, h('h3', {}, 'Keys expiring soon'), simpleTable(['Key', 'Expires'], expiring.slice(0, 8).map((k) => [`${k.tenant_id} ${k.key_prefix}`, fmt.time(k.expires_at)]))),
      h('section', { class: 'card' }, h('h3', {}, 'Recent denials by reason'), simpleTable(['Reason', 'Count'], Object.entries(denialReasons).map(([k, v]) => [h('a', { href: '#/denials' }, k), String(v)])))),
    h('div', { class: 'cards two' },
      h('section', { class: 'card' }, h('h2', {}, 'Recent operator activity'), simpleTable(['Time', 'Operation', 'Status', 'Resource'], auditRows.map((a) => [fmt.time(a.timestamp), a.operation, badge(String(a.status), a.status >= 400 ? 'crit' : 'ok'), `${a.resource_type || ''} ${a.resource_id || ''}`]))),
      h('section', { class: 'card' }, h('h2', {}, 'Live events'), eventsList)));
  return () => live.removeEventListener('event', onLive);
}
