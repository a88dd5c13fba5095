import { get, getAll, post, session, uuid } from '../api.js';
import { h, clear, fmt, badge, bar, utilization, formDialog, confirmDialog, toast, dialog, errorBox } from '../ui.js';
import { listPage, markTruncated, amountOf, scopeCell } from './common.js';
import { go } from '../main.js';

export const UNITS = ['USD_MICROCENTS', 'TOKENS', 'CREDITS', 'RISK_POINTS'];
export const LEVELS = ['tenant', 'workspace', 'app', 'workflow', 'agent', 'toolset'];
const BANDS = { '': 'any', '0-0.5': 'below 50%', '0.5-0.8': '50–80%', '0.8-0.95': '80–95%', '0.95-1': '95–100%', '1-': 'at or over 100%' };

export function tenantOfScope(scope) { return scope.split('/')[0].replace(/^tenant:/, ''); }

export function budgetQuery(v) {
  const q = { tenant_id: session.isAdmin ? v.tenant_id : undefined, status: v.status || undefined, unit: v.unit || undefined,
    scope_prefix: v.scope_prefix || undefined, over_limit: v.over_limit ? 'true' : undefined, has_debt: v.has_debt ? 'true' : undefined };
  if (v.band) {
    const [lo, hi] = v.band.split('-');
    if (lo) q.utilization_min = lo;
    if (hi) q.utilization_max = hi;
  }
  return q;
}

export async function loadBudgets(v, onPage, max = 5000) {
  const { rows, more } = await getAll('/v1/admin/budgets', budgetQuery(v), 'ledgers', { max, onPage });
  const shown = v.status || v.show_closed ? rows : rows.filter((b) => b.status !== 'CLOSED');
  return markTruncated(shown, more);
}

export function budgetColumns(refresh, { tenant = true } = {}) {
  const cols = [
    { label: 'Scope', value: (b) => b.scope, render: (b) => scopeCell(b.scope), width: 'minmax(200px, 2.4fr)' },
    { label: 'Unit', value: (b) => b.unit, width: '125px' },
    { label: 'Status', value: (b) => b.status, render: (b) => h('span', {}, badge(b.status), b.is_over_limit ? badge('OVER LIMIT', 'crit') : null), width: '120px' },
    { label: 'Allocated', value: (b) => amountOf(b.allocated), render: (b) => fmt.int(amountOf(b.allocated)), class: 'num' },
    { label: 'Spent', value: (b) => amountOf(b.spent), render: (b) => fmt.int(amountOf(b.spent)), class: 'num' },
    { label: 'Reserved', value: (b) => amountOf(b.reserved), render: (b) => fmt.int(amountOf(b.reserved)), class: 'num' },
    { label: 'Remaining', value: (b) => amountOf(b.remaining), render: (b) => fmt.int(amountOf(b.remaining)), class: 'num' },
    { label: 'Debt', value: (b) => amountOf(b.debt), render: (b) => (amountOf(b.debt) ? h('span', { class: 'crit-text' }, fmt.int(amountOf(b.debt))) : '0'), class: 'num' },
    { label: 'Utilization', value: (b) => utilization(b) ?? -1, render: (b) => h('span', { class: 'util' }, bar(utilization(b)), fmt.pct(utilization(b))), width: '140px' },
    { label: 'Actions', value: () => '', export: () => '', render: (b) => budgetActions(b, refresh), width: 'minmax(190px, 1.3fr)' },
  ];
  return tenant ? cols : cols;
}

export function budgetActions(b, refresh) {
  const out = [];
  const label = b.scope;
  if (session.can('manage_budgets') && b.status !== 'CLOSED') {
    out.push(h('button', { type: 'button', class: 'small', 'aria-label': `Fund ${label}`, onclick: () => fundDialog(b).then((ok) => ok && refresh()) }, 'Fund'));
  }
  if (session.isAdmin && session.can('manage_budgets')) {
    if (b.status === 'ACTIVE') out.push(h('button', { type: 'button', class: 'small warn', 'aria-label': `Freeze ${label}`, onclick: () => freeze(b, true).then((ok) => ok && refresh()) }, 'Freeze'));
    if (b.status === 'FROZEN') out.push(h('button', { type: 'button', class: 'small', 'aria-label': `Unfreeze ${label}`, onclick: () => freeze(b, false).then((ok) => ok && refresh()) }, 'Unfreeze'));
  }
  out.push(h('a', { class: 'small-link', href: `#/spend?${new URLSearchParams({ tenant: tenantOfScope(b.scope), scope: b.scope, unit: b.unit })}` }, 'Spend'));
  return h('span', { class: 'row-actions' }, out);
}

function target(b) {
  const q = { scope: b.scope, unit: b.unit };
  if (session.isAdmin) q.tenant_id = tenantOfScope(b.scope);
  return q;
}

export async function freeze(b, on) {
  const ok = await formDialog(`${on ? 'Freeze' : 'Unfreeze'} budget`, [
    { name: 'reason', label: 'Reason (recorded in the audit log)', value: on ? 'frozen from the dashboard' : '' },
  ], on ? 'Freeze budget' : 'Unfreeze budget', async (v) => {
    await post(`/v1/admin/budgets/${on ? 'freeze' : 'unfreeze'}`, v.reason ? { reason: v.reason } : {}, { scope: b.scope, unit: b.unit });
  }, { intro: h('p', {}, on ? `New reservations against ${b.scope} (${b.unit}) will be refused; in-flight ones can still commit.` : `${b.scope} (${b.unit}) will accept reservations again.`) });
  if (ok) toast(`${on ? 'Froze' : 'Unfroze'} ${b.scope}`, 'ok');
  return ok;
}

export const OPERATIONS = {
  CREDIT: 'add to allocated', DEBIT: 'take from allocated', RESET: 'set allocated to the amount',
  RESET_SPENT: 'set allocated, and spent to the given value', REPAY_DEBT: 'pay debt down by the amount',
};

export async function fundDialog(b) {
  const ok = await formDialog(`Fund ${b.scope}`, [
    { name: 'operation', label: 'Operation', type: 'select', options: Object.entries(OPERATIONS).map(([k, v]) => [k, `${k} — ${v}`]) },
    { name: 'amount', label: `Amount (${fmt.unit(b.unit)}, integer)`, type: 'number', min: 0, step: 1, required: true, value: '' },
    { name: 'spent', label: 'Spent after RESET_SPENT (optional, integer)', type: 'number', min: 0, step: 1 },
    { name: 'reason', label: 'Reason (audit log)', value: '' },
  ], 'Apply', async (v) => {
    const amount = parseAmount(v.amount);
    const body = { operation: v.operation, amount: { unit: b.unit, amount }, idempotency_key: uuid() };
    if (v.reason) body.reason = v.reason;
    if (v.operation === 'RESET_SPENT' && v.spent !== '') body.spent = { unit: b.unit, amount: parseAmount(v.spent) };
    const res = await post('/v1/admin/budgets/fund', body, target(b));
    return res;
  }, { intro: h('p', { class: 'muted' }, `Allocated ${fmt.int(amountOf(b.allocated))}, remaining ${fmt.int(amountOf(b.remaining))}, debt ${fmt.int(amountOf(b.debt))}.`) });
  if (ok) toast(`${ok.operation || 'Funding'} applied to ${b.scope}: allocated ${fmt.int(amountOf(ok.new_allocated))}`, 'ok');
  return ok;
}

export function parseAmount(s) {
  const t = String(s).trim();
  if (!/^\d+$/.test(t)) throw new Error('Amounts are whole numbers in the unit (no decimals, no sign).');
  const n = Number(t);
  if (!Number.isSafeInteger(n)) throw new Error('Amount is too large.');
  return n;
}

// The scope builder: one field per level, the scope shown as it is built.
export function createBudgetDialog(tenantId) {
  const preview = h('code', { class: 'scope-preview', id: 'scope-preview' }, '');
  const build = (inputs) => {
    const parts = [];
    for (const l of LEVELS) { const v = (inputs[`lvl_${l}`]?.value || '').trim(); if (v) parts.push(`${l}:${v}`); }
    return parts.join('/');
  };
  const levelFields = LEVELS.map((l) => ({ name: `lvl_${l}`, label: l === 'tenant' ? 'Tenant' : `${l[0].toUpperCase()}${l.slice(1)} (optional)`,
    value: l === 'tenant' ? (tenantId || session.tenant || '') : '', required: l === 'tenant',
    onchange: (_, inputs) => { preview.textContent = build(inputs) || '—'; } }));
  return formDialog('Create budget', [
    ...levelFields,
    { type: 'custom', build: () => h('p', {}, 'Scope: ', preview) },
    { name: 'unit', label: 'Unit', type: 'select', options: UNITS },
    { name: 'allocated', label: 'Allocated (integer amount in the unit)', type: 'number', min: 0, step: 1, required: true },
    { name: 'overdraft', label: 'Overdraft limit (optional)', type: 'number', min: 0, step: 1 },
    { name: 'policy', label: 'Commit overage policy', type: 'select', options: [['', 'default'], 'REJECT', 'ALLOW_IF_AVAILABLE', 'ALLOW_WITH_OVERDRAFT'] },
  ], 'Create budget', async (v, inputs) => {
    const scope = build(inputs);
    if (!v.lvl_tenant) throw new Error('The tenant is required.');
    const body = { scope, unit: v.unit, allocated: { unit: v.unit, amount: parseAmount(v.allocated) } };
    if (session.isAdmin) body.tenant_id = v.lvl_tenant;
    if (v.overdraft !== '') body.overdraft_limit = { unit: v.unit, amount: parseAmount(v.overdraft) };
    if (v.policy) body.commit_overage_policy = v.policy;
    const created = await post('/v1/admin/budgets', body);
    toast(`Created budget ${created.scope}`, 'ok');
    return created;
  }, { wide: true });
}

async function bulkFund(values, refresh) {
  if (!values.tenant_id) { toast('Bulk funding works on one tenant: set the tenant filter first.', 'error'); return; }
  const q = budgetQuery(values);
  const { rows } = await getAll('/v1/admin/budgets', q, 'ledgers', { max: 10000 });
  const filter = { tenant_id: values.tenant_id };
  for (const k of ['scope_prefix', 'unit', 'status', 'utilization_min', 'utilization_max']) if (q[k]) filter[k] = k.startsWith('utilization') ? Number(q[k]) : q[k];
  if (q.over_limit) filter.over_limit = true;
  if (q.has_debt) filter.has_debt = true;
  const ok = await formDialog('Bulk fund budgets', [
    { name: 'action', label: 'Operation', type: 'select', options: Object.keys(OPERATIONS) },
    { name: 'unit', label: 'Unit of the amount', type: 'select', options: UNITS, value: values.unit || UNITS[0] },
    { name: 'amount', label: 'Amount (integer)', type: 'number', min: 0, step: 1, required: true },
    { name: 'reason', label: 'Reason (audit log)' },
  ], `Apply to ${rows.length} budgets`, async (v) => {
    const body = { filter, action: v.action, idempotency_key: uuid(), expected_count: rows.length,
      amount: { unit: v.unit, amount: parseAmount(v.amount) } };
    if (v.reason) body.reason = v.reason;
    return post('/v1/admin/budgets/bulk-action', body);
  }, { intro: h('div', {}, h('p', {}, `Preview: ${rows.length} budget(s) match the current filters. The server refuses if the count changed.`),
    h('ul', { class: 'preview' }, rows.slice(0, 8).map((b) => h('li', {}, `${b.scope} (${b.unit})`)), rows.length > 8 ? h('li', {}, `… and ${rows.length - 8} more`) : null)) });
  if (ok) { toast(`Bulk ${ok.action}: ${ok.succeeded.length} succeeded, ${ok.failed.length} failed`, ok.failed.length ? 'error' : 'ok'); refresh(); }
}

export function render(main, r) {
  const filters = [];
  if (session.isAdmin) filters.push({ name: 'tenant_id', label: 'Tenant', type: 'text', placeholder: 'all tenants' });
  filters.push(
    { name: 'status', label: 'Status', type: 'select', options: [['', 'any'], 'ACTIVE', 'FROZEN', 'CLOSED'] },
    { name: 'unit', label: 'Unit', type: 'select', options: [['', 'any'], ...UNITS] },
    { name: 'band', label: 'Utilization', type: 'select', options: Object.entries(BANDS) },
    { name: 'scope_prefix', label: 'Scope prefix', type: 'text' },
    { name: 'over_limit', label: 'Over limit', type: 'checkbox' },
    { name: 'has_debt', label: 'In debt', type: 'checkbox' },
    { name: 'show_closed', label: 'Show closed', type: 'checkbox' });
  let page;
  const actions = [];
  if (session.can('manage_budgets')) {
    actions.push(h('button', { type: 'button', class: 'primary', id: 'create-budget', onclick: () => createBudgetDialog(page.values.tenant_id).then((x) => x && page.refresh()) }, 'Create budget'));
  }
  if (session.isAdmin && session.can('manage_budgets')) {
    actions.push(h('button', { type: 'button', id: 'bulk-fund', onclick: () => bulkFund(page.values, page.refresh) }, 'Bulk fund…'));
  }
  page = listPage(main, r, { title: 'Budgets', name: 'budgets', filters, actions,
    columns: budgetColumns(() => page.refresh()), key: (b) => `${b.scope}|${b.unit}`,
    load: (v, onPage) => loadBudgets(v, onPage), liveTypes: ['budget.'] });
  return page.cleanup;
}

export function commands() {
  return [{ label: 'Create budget', run: () => createBudgetDialog() },
    { label: 'Budgets: frozen', run: () => go('budgets', { status: 'FROZEN' }) },
    { label: 'Budgets: in debt', run: () => go('budgets', { has_debt: '1' }) },
    { label: 'Budgets: over limit', run: () => go('budgets', { over_limit: '1' }) }];
}

// ---- the hierarchy tree: tenant → workspace → app → workflow → agent → toolset ----
export async function renderTree(main, r) {
  const tenant = session.isAdmin ? (r.params.get('tenant') || '') : session.tenant;
  const unit = r.params.get('unit') || '';
  const tenantInput = h('input', { id: 'tree-tenant', value: tenant || '', placeholder: 'tenant id' });
  const unitSel = h('select', { id: 'tree-unit' }, ['', ...UNITS].map((u) => h('option', { value: u, selected: u === unit }, u || 'any')));
  const box = h('div', { class: 'tree' });
  const apply = () => go('hierarchy', { tenant: tenantInput.value.trim(), unit: unitSel.value });
  clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'Budget hierarchy')),
    h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); apply(); } },
      session.isAdmin ? h('div', { class: 'filter' }, h('label', { for: 'tree-tenant' }, 'Tenant'), tenantInput) : null,
      h('div', { class: 'filter' }, h('label', { for: 'tree-unit' }, 'Unit'), unitSel),
      h('button', { type: 'submit' }, 'Show tree')), box);
  unitSel.addEventListener('change', apply);
  if (!tenant) { box.append(h('p', { class: 'muted' }, 'Choose a tenant to see its budget tree.')); return; }
  try {
    const { rows } = await getAll('/v1/admin/budgets', { tenant_id: session.isAdmin ? tenant : undefined, unit: unit || undefined }, 'ledgers', { max: 5000 });
    const live = rows.filter((b) => b.status !== 'CLOSED').sort((a, b) => a.scope.localeCompare(b.scope) || a.unit.localeCompare(b.unit));
    const nodes = new Map();
    const root = { children: [], depth: -1 };
    for (const b of live) {
      const parts = b.scope.split('/');
      let parent = root;
      for (let i = 1; i < parts.length; i++) { // nearest budgeted ancestor
        const anc = nodes.get(`${parts.slice(0, i).join('/')}|${b.unit}`);
        if (anc) parent = anc;
      }
      const node = { b, children: [] };
      nodes.set(`${b.scope}|${b.unit}`, node);
      parent.children.push(node);
    }
    const draw = (node) => h('li', {}, h('details', { open: true },
      h('summary', {}, h('span', { class: 'tree-scope' }, node.b.scope.split('/').pop(), ' ', h('small', { class: 'muted' }, node.b.unit)),
        bar(utilization(node.b)), h('span', { class: 'muted' }, ` ${fmt.pct(utilization(node.b))} of ${fmt.int(amountOf(node.b.allocated))}`),
        node.b.status !== 'ACTIVE' ? badge(node.b.status) : null,
        h('a', { class: 'small-link', href: `#/spend?${new URLSearchParams({ tenant: tenantOfScope(node.b.scope), scope: node.b.scope, unit: node.b.unit })}` }, 'spend')),
      node.children.length ? h('ul', {}, node.children.map(draw)) : null));
    box.append(root.children.length ? h('ul', { class: 'tree-root' }, root.children.map(draw)) : h('p', { class: 'muted' }, 'No open budgets.'));
  } catch (e) { box.append(errorBox(e)); }
}
