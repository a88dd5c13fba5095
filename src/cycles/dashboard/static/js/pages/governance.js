// Action governance (v0.1.26): live quota counters (reset by an operator), observe mode's would-be
// denials, and the policy editor's action rules (access lists from the kind registry, quotas).
import { get, getAll, post, patch, session } from '../api.js';
import { h, clear, fmt, badge, bar, table, formDialog, toast, errorBox } from '../ui.js';
import { lineChart, hbars } from '../chart.js';
import { go, live } from '../main.js';
import { WINDOWS } from './spend.js';

export const QUOTA_WINDOWS = ['per_run', 'per_minute_tumbling', 'per_hour_tumbling', 'per_day_tumbling', 'per_tenant_per_day'];
export const RISK_CLASSES = ['read_only', 'local_mutation', 'side_effect', 'external_side_effect', 'high_risk'];
const RISK = '__risk__';

// Who may see the counters: an operator that reads, or a tenant key with action_quotas:read (or the
// deprecated balances:read). Resetting is operator-only (the route refuses tenant keys).
export function canViewQuotas() {
  if (session.isAdmin) return session.can('view_reservations');
  const perms = (session.who && session.who.permissions) || [];
  return perms.includes('action_quotas:read') || perms.includes('balances:read');
}
export const canResetQuotas = () => session.isAdmin && session.can('manage_reservations');
const canViewObserved = () => session.can('view_events');
export const canViewGovernance = () => canViewQuotas() || canViewObserved();

// The public kind registry, read once per page load (it changes only with a server upgrade).
let registry = null;
export async function actionKinds() {
  if (!registry) {
    registry = getAll('/v1/action-kinds', {}, 'kinds', { max: 1000, pageSize: 100 }).then((x) => x.rows)
      .catch((e) => { registry = null; throw e; });
  }
  return registry;
}

function resetDialog(tenant, c) {
  const what = c.action_kind === RISK ? `risk class ${c.risk_class}` : c.action_kind;
  return formDialog(`Reset quota counter of ${what}`, [
    { name: 'reason', label: 'Reason (audit log)', value: 'reset from the dashboard', required: true },
  ], 'Reset counter', async (v) => {
    const body = { tenant_id: tenant, scope: c.scope, action_kind: c.action_kind, window: c.window, window_key: c.window_key, reason: v.reason };
    if (c.action_kind === RISK) body.risk_class = c.risk_class;
    const res = await post('/v1/admin/action-quota-counters/reset', body);
    toast(`Reset ${what} at ${c.scope} (was ${res.previous_used})`, 'ok');
    return res;
  }, { intro: h('p', {}, `${c.scope}, ${c.window} ${c.window_key}: ${c.used} of ${c.limit} used. The count goes back to 0 at once; the reset is audited and emits quota.counter_reset.`) });
}

async function quotaSection(box, tenant, params) {
  const includeZero = params.get('include_zero') === '1';
  const cols = [
    { label: 'Scope', value: (c) => c.scope, width: 'minmax(180px, 2fr)' },
    { label: 'Action kind', value: (c) => (c.action_kind === RISK ? `risk: ${c.risk_class}` : c.action_kind), width: 'minmax(150px, 1.3fr)' },
    { label: 'Window', value: (c) => `${c.window} ${c.window_key || ''}`.trim(), width: 'minmax(140px, 1.2fr)' },
    { label: 'Used', value: (c) => c.used, class: 'num', width: '60px' },
    { label: 'Limit', value: (c) => c.limit, class: 'num', width: '60px' },
    { label: 'Headroom', value: (c) => c.used / Math.max(1, c.limit), width: '130px',
      render: (c) => h('span', { class: 'util' }, bar(c.used / Math.max(1, c.limit)), `${c.remaining ?? c.limit - c.used} left`) },
    { label: 'Policy', value: (c) => c.policy_id || '', class: 'mono', width: '90px' },
    { label: 'Last counted', width: '100px', value: (c) => c.last_incremented_at || '', render: (c) => (c.last_incremented_at ? fmt.ago(c.last_incremented_at) : '—') },
    { label: 'Actions', value: () => '', export: () => '', width: '80px', render: (c) => (canResetQuotas() && c.used > 0
      ? h('button', { type: 'button', class: 'small warn', 'aria-label': `Reset ${c.scope} ${c.action_kind === RISK ? c.risk_class : c.action_kind} ${c.window_key || ''}`.trim(),
        onclick: () => resetDialog(tenant, c).then((ok) => ok && load()) }, 'Reset') : '') },
  ];
  const t = table(cols, { name: 'quota-counters', height: '420px' });
  const state = h('p', { class: 'muted load-state', 'aria-live': 'polite' });
  const zero = h('input', { type: 'checkbox', id: 'quota-zero', checked: includeZero });
  zero.addEventListener('change', () => go('governance', { tenant: session.isAdmin ? tenant : '', include_zero: zero.checked ? '1' : '' }));
  box.append(h('section', { class: 'card wide', id: 'quota-counters' }, h('h2', {}, 'Action quota counters'),
    h('p', { class: 'muted' }, 'Live counts of the action_quotas and risk_class_quotas of this tenant\'s policies, one per matched scope and window.'),
    h('div', { class: 'field check' }, zero, h('label', { for: 'quota-zero' }, ' Show counters at 0')), state, t.el));
  async function load() {
    state.textContent = 'Loading…';
    try {
      const { rows, more } = await getAll('/v1/admin/action-quota-counters', { tenant_id: session.isAdmin ? tenant : undefined,
        include_zero: includeZero ? 'true' : undefined }, 'counters', { max: 5000, pageSize: 200 });
      t.set(rows, (c) => `${c.scope}|${c.action_kind}|${c.risk_class || ''}|${c.window}|${c.window_key || ''}`);
      state.textContent = more ? 'Showing the first 5,000 counters.' : '';
    } catch (e) { state.replaceChildren(errorBox(e)); }
  }
  await load();
  return load;
}

async function observedSection(box, tenant, windowS) {
  const card = h('section', { class: 'card wide', id: 'observed' }, h('h2', {}, 'Observe mode: would-be denials'));
  box.append(card);
  let mode = null;
  if (session.isAdmin && session.can('view_tenants')) {
    try { mode = (await get(`/v1/admin/tenants/${encodeURIComponent(tenant)}`)).observe_mode || 'ENFORCE'; } catch (e) { mode = null; }
  }
  if (mode) {
    const other = mode === 'OBSERVE' ? 'ENFORCE' : 'OBSERVE';
    card.append(h('p', {}, 'Tenant mode: ', badge(mode, mode === 'OBSERVE' ? 'warn' : 'ok'), ' ',
      session.can('manage_tenants') ? h('button', { type: 'button', class: 'small', id: 'observe-toggle', onclick: async () => {
        const ok = await formDialog(`Set ${tenant} to ${other}`, [], `Set ${other}`, async () => patch(`/v1/admin/tenants/${encodeURIComponent(tenant)}`, { observe_mode: other }),
          { intro: h('p', {}, other === 'OBSERVE' ? 'Every reservation is evaluated in full and changes nothing: no hold, no counter moves, and each evaluation is recorded as observed_allowed or observed_denied.'
            : 'Rules are enforced again: denials refuse reservations.') });
        if (ok) { toast(`${tenant} is now ${other}`, 'ok'); go('governance', { tenant: session.isAdmin ? tenant : '', window: windowS, t: Date.now() }); }
      } }, `Switch to ${other}`) : null));
  }
  const d = await get(session.isAdmin ? '/v1/admin/denials' : '/v1/denials', { tenant_id: session.isAdmin ? tenant : undefined, observed: 'true',
    from: new Date(Date.now() - Number(windowS) * 1000).toISOString() });
  // empty lists are left out of the answer
  const bars = (title, rows, label) => h('section', { class: 'card' }, h('h3', {}, title), hbars((rows || []).map((x) => ({ key: x.key, value: x.count })), { label }));
  card.append(
    h('p', { id: 'observed-total' }, `${fmt.int(d.total || 0)} reservation(s) would have been denied in the window (reservation.observed_denied); nothing was refused.`),
    lineChart((d.series || []).map((x) => ({ t: x.start_ms, v: x.count })), { label: 'would-be denials over time' }),
    h('div', { class: 'cards' },
      bars('By reason', d.by_reason, 'would-be denials by reason'),
      bars('By policy', d.by_policy, 'would-be denials by policy'),
      bars('By action kind', d.by_kind, 'would-be denials by action kind'),
      bars('By agent', d.by_agent, 'would-be denials by agent')),
    h('p', {}, h('a', { href: `#/events?${new URLSearchParams({ ...(session.isAdmin ? { tenant_id: tenant } : {}), event_type: 'reservation.observed_denied' })}` }, 'The observed_denied events')));
}

export async function render(main, r) {
  const p = r.params;
  const tenant = session.isAdmin ? (p.get('tenant') || '') : session.tenant;
  const windowS = p.get('window') || '86400';
  const tenantIn = h('input', { id: 'gov-tenant', value: tenant || '', placeholder: 'tenant id' });
  const winSel = h('select', { id: 'gov-window' }, WINDOWS.map(([k, l]) => h('option', { value: k, selected: k === windowS }, l)));
  const apply = () => go('governance', { tenant: session.isAdmin ? tenantIn.value.trim() : '', window: winSel.value });
  winSel.addEventListener('change', apply);
  const box = h('div', { id: 'gov-box' });
  clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'Action governance')),
    h('form', { class: 'filters', 'aria-label': 'Governance filters', onsubmit: (e) => { e.preventDefault(); apply(); } },
      session.isAdmin ? h('div', { class: 'filter' }, h('label', { for: 'gov-tenant' }, 'Tenant'), tenantIn) : null,
      h('div', { class: 'filter' }, h('label', { for: 'gov-window' }, 'Window (observe mode)'), winSel),
      h('button', { type: 'submit' }, 'Show')), box);
  if (!tenant) { box.append(h('p', { class: 'muted' }, 'Choose a tenant to see its quota counters and observe-mode results.')); return null; }
  let reload = null;
  try {
    if (canViewQuotas()) reload = await quotaSection(box, tenant, p);
    if (canViewObserved()) await observedSection(box, tenant, windowS);
  } catch (e) { box.append(errorBox(e)); }
  // counters move with reservations: refresh at most once a second on a relevant event
  let pending = null;
  const onLive = (e) => {
    const ev = e.detail;
    if (!reload || ev.tenant_id !== tenant || pending || !/^(reservation\.|quota\.)/.test(ev.event_type)) return;
    pending = setTimeout(() => { pending = null; reload(); }, 1000);
  };
  live.addEventListener('event', onLive);
  return () => { live.removeEventListener('event', onLive); clearTimeout(pending); };
}

// ---- the policy editor's action rules ----

function kindPicker(kinds, chosen, name) {
  const boxes = {};
  const filter = h('input', { type: 'search', placeholder: 'Filter kinds…', 'aria-label': `Filter kinds (${name})` });
  const custom = h('input', { type: 'text', id: `${name}-custom`, value: chosen.filter((k) => !kinds.some((x) => x.kind === k)).join(', '),
    placeholder: 'custom.acme.erp.post, …' });
  const grid = h('div', { class: 'kind-grid' }, kinds.map((k) => {
    const id = `${name}-${k.kind.replace(/[^a-z0-9]/gi, '-')}`;
    boxes[k.kind] = h('input', { type: 'checkbox', id, checked: chosen.includes(k.kind), dataset: { kind: k.kind } });
    return h('label', { for: id, class: 'check', title: k.description || '', dataset: { kind: k.kind } }, boxes[k.kind], ` ${k.kind} `, h('small', { class: `risk ${k.risk_class}` }, k.risk_class));
  }));
  filter.addEventListener('input', () => {
    const q = filter.value.toLowerCase();
    grid.querySelectorAll('label').forEach((l) => { l.hidden = q && !l.dataset.kind.includes(q); });
  });
  const el = h('div', { class: 'kind-picker' }, filter, grid,
    h('div', { class: 'field' }, h('label', { for: `${name}-custom` }, 'Other kinds (comma-separated; custom.* must be declared on the server)'), custom));
  return { el, value: () => [...Object.keys(boxes).filter((k) => boxes[k].checked),
    ...custom.value.split(',').map((s) => s.trim()).filter(Boolean)] };
}

function num(v, what) {
  const t = String(v).trim();
  if (!/^\d+$/.test(t) || Number(t) < 1) throw new Error(`${what} must be a whole number of at least 1.`);
  return Number(t);
}

// The optional fields of a quota rule (cycles-action-kinds-v0.1.26.yaml): allowlists on ActionQuota
// only; per_run_counter_ttl_ms only with window per_run (the server refuses it on other windows).
const ALLOWLISTS = [['host_allowlist', 'Host allowlist', 253, 'api.openai.com, api.anthropic.com'],
  ['recipient_domain_allowlist', 'Recipient domain allowlist', 253, 'example.com'],
  ['resource_type_allowlist', 'Resource type allowlist', 128, 'invoice']];
const OPTIONAL = [...ALLOWLISTS.map(([k]) => k), 'threshold_pct', 'per_run_counter_ttl_ms'];

function listValue(input, label, maxLen) {
  const items = input.value.split(',').map((x) => x.trim()).filter(Boolean);
  if (items.length > 200) throw new Error(`${label}: at most 200 entries.`);
  const long = items.find((x) => x.length > maxLen);
  if (long) throw new Error(`${label}: "${long.slice(0, 40)}…" is longer than ${maxLen} characters.`);
  return items;
}

function quotaExtras(rule, win, risk) {
  const lists = risk ? [] : ALLOWLISTS.map(([key, label, maxLen, ph]) => ({ key, label, maxLen,
    input: h('input', { type: 'text', 'aria-label': label, value: (rule[key] || []).join(', '), placeholder: ph, spellcheck: 'false' }) }));
  const pct = h('input', { type: 'number', min: 0.01, max: 0.99, step: 0.01, 'aria-label': 'Alert threshold',
    value: rule.threshold_pct ?? '', placeholder: '0.80 (default)' });
  const ttl = h('input', { type: 'number', min: 60000, max: 604800000, step: 1, 'aria-label': 'Per-run counter TTL (ms)',
    value: rule.per_run_counter_ttl_ms ?? '', placeholder: '86400000 (default: 24 h)' });
  const syncTtl = () => { ttl.disabled = win.value !== 'per_run'; };
  win.addEventListener('change', syncTtl);
  syncTtl();
  const field = (label, input, hint) => h('label', { class: 'extra' }, h('span', {}, label), input, hint ? h('small', { class: 'muted' }, hint) : null);
  const set = OPTIONAL.some((k) => rule[k] != null && !(Array.isArray(rule[k]) && !rule[k].length));
  const el = h('details', { class: 'quota-more', open: set },
    h('summary', {}, risk ? 'Alert threshold, run TTL' : 'Allowlists, alert threshold, run TTL'),
    ...lists.map((l) => field(l.label, l.input, 'comma-separated; when set, only calls whose policy_keys match are counted')),
    field('Alert threshold', pct, 'share of the limit, 0.01–0.99, at which quota.threshold_approaching is emitted'),
    field('Per-run counter TTL (ms)', ttl, '60000–604800000; per_run quotas only'));
  return {
    el,
    apply(out) { // writes the optional fields into out; blank ones are left out (the server's default)
      for (const k of OPTIONAL) delete out[k];
      for (const l of lists) { const v = listValue(l.input, l.label, l.maxLen); if (v.length) out[l.key] = v; }
      const p = pct.value.trim();
      if (p) {
        const x = Number(p);
        if (!Number.isFinite(x) || x < 0.01 || x > 0.99) throw new Error('Alert threshold must be between 0.01 and 0.99 (a fraction of max calls).');
        out.threshold_pct = x;
      }
      const t = ttl.value.trim();
      if (t && !ttl.disabled) {
        if (!/^\d+$/.test(t) || Number(t) < 60000 || Number(t) > 604800000) throw new Error('Per-run counter TTL must be a whole number of ms from 60000 to 604800000.');
        out.per_run_counter_ttl_ms = Number(t);
      }
      return out;
    },
  };
}

// Rows of quotas; each row keeps the rule it came from, so a field this dialog does not know is sent
// back as it was.
function quotaRows(kinds, rules, { risk }) {
  const list = h('div', { class: 'quota-rows' });
  const rows = [];
  const dl = risk ? null : h('datalist', { id: 'kind-options' }, kinds.map((k) => h('option', { value: k.kind }, k.risk_class)));
  const add = (rule) => {
    const first = risk
      ? h('select', { 'aria-label': 'Risk class' }, RISK_CLASSES.map((c) => h('option', { value: c, selected: c === rule.risk_class }, c)))
      : h('input', { type: 'text', list: 'kind-options', 'aria-label': 'Action kind', value: rule.action_kind || '', placeholder: 'message.email.send' });
    const max = h('input', { type: 'number', min: 1, step: 1, 'aria-label': 'Max calls', value: rule.max_calls ?? '' });
    const win = h('select', { 'aria-label': 'Window' }, QUOTA_WINDOWS.map((w) => h('option', { value: w, selected: w === (rule.window || 'per_hour_tumbling') }, w)));
    const extras = quotaExtras(rule, win, risk);
    const row = { rule, first, max, win, extras };
    const el = h('div', { class: 'quota-row' }, first, max, win,
      h('button', { type: 'button', class: 'small', 'aria-label': 'Remove this quota', onclick: () => { rows.splice(rows.indexOf(row), 1); el.remove(); } }, 'Remove'),
      extras.el);
    rows.push(row);
    list.append(el);
  };
  for (const rule of rules || []) add(rule);
  const el = h('div', {}, dl, list, h('button', { type: 'button', class: 'small', id: risk ? 'add-risk-quota' : 'add-action-quota', onclick: () => add({}) },
    risk ? 'Add risk-class quota' : 'Add action quota'));
  return { el, value: () => rows.map(({ rule, first, max, win, extras }) => {
    const out = { ...rule, max_calls: num(max.value, 'Max calls'), window: win.value };
    if (risk) out.risk_class = first.value;
    else { if (!first.value.trim()) throw new Error('Each action quota needs an action kind.'); out.action_kind = first.value.trim(); }
    return extras.apply(out);
  }) };
}

// The custom block of the policy dialog: returns {el, apply(body)} which writes the four fields.
export async function actionRulesEditor(p) {
  let kinds = [];
  let note = null;
  try { kinds = await actionKinds(); } catch (e) { note = h('p', { class: 'warn-text' }, `The kind registry could not be read (${e.message}); type kinds by name.`); }
  const allowed = (p && p.allowed_action_kinds) || [];
  const denied = (p && p.denied_action_kinds) || [];
  const mode = h('select', { id: 'acl-mode' }, [['', 'no access list'], ['denied', 'deny these kinds'], ['allowed', 'allow only these kinds']]
    .map(([v, l]) => h('option', { value: v, selected: v === (denied.length ? 'denied' : allowed.length ? 'allowed' : '') }, l)));
  const picker = kindPicker(kinds, denied.length ? denied : allowed, 'acl');
  const sync = () => { picker.el.hidden = !mode.value; };
  mode.addEventListener('change', sync);
  sync();
  const quotas = quotaRows(kinds, p && p.action_quotas, { risk: false });
  const riskQuotas = quotaRows(kinds, p && p.risk_class_quotas, { risk: true });
  const el = h('fieldset', { class: 'action-rules' }, h('legend', {}, 'Action rules (v0.1.26)'), note,
    h('div', { class: 'field' }, h('label', { for: 'acl-mode' }, 'Action kind access list'), mode), picker.el,
    h('h3', {}, 'Action quotas (calls per window, per matched scope)'), quotas.el,
    h('h3', {}, 'Risk-class quotas'), riskQuotas.el);
  return {
    el,
    apply(body) {
      const list = mode.value ? picker.value() : [];
      if (mode.value && !list.length) throw new Error('Choose at least one kind for the access list, or set it to "no access list".');
      // PATCH replaces a list and [] clears it; one list or the other, never both
      body.denied_action_kinds = mode.value === 'denied' ? list : [];
      body.allowed_action_kinds = mode.value === 'allowed' ? list : [];
      body.action_quotas = quotas.value();
      body.risk_class_quotas = riskQuotas.value();
      if (!p) for (const k of ['denied_action_kinds', 'allowed_action_kinds', 'action_quotas', 'risk_class_quotas']) if (!body[k].length) delete body[k];
      return body;
    },
  };
}

export function rulesSummary(p) {
  const parts = [];
  if ((p.denied_action_kinds || []).length) parts.push(`deny ${p.denied_action_kinds.join(', ')}`);
  if ((p.allowed_action_kinds || []).length) parts.push(`allow only ${p.allowed_action_kinds.join(', ')}`);
  const extra = (q) => {
    const bits = ALLOWLISTS.filter(([k]) => (q[k] || []).length).map(([k]) => `${k.replace('_allowlist', '').replace(/_/g, ' ')} ${q[k].join('|')}`);
    if (q.threshold_pct != null) bits.push(`alert ${Math.round(q.threshold_pct * 100)}%`);
    if (q.per_run_counter_ttl_ms != null) bits.push(`run ttl ${q.per_run_counter_ttl_ms} ms`);
    return bits.length ? ` (${bits.join(', ')})` : '';
  };
  for (const q of p.action_quotas || []) parts.push(`${q.action_kind} ≤ ${q.max_calls} ${q.window}${extra(q)}`);
  for (const q of p.risk_class_quotas || []) parts.push(`${q.risk_class} ≤ ${q.max_calls} ${q.window}${extra(q)}`);
  return parts.join('; ') || '—';
}

