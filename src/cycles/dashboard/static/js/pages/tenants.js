import { get, getAll, post, patch, session } from '../api.js';
import { h, clear, fmt, badge, formDialog, confirmDialog, toast, table, simpleTable, errorBox } from '../ui.js';
import { listPage, markTruncated } from './common.js';
import { budgetColumns, createBudgetDialog } from './budgets.js';
import { keyColumns, createKeyDialog } from './lists.js';
import { spendPanel } from './spend.js';
import { go } from '../main.js';
import { actionRulesEditor, rulesSummary } from './governance.js';

export async function setTenantStatus(t, status) {
  const verb = status === 'SUSPENDED' ? 'Suspend' : 'Reactivate';
  const ok = await confirmDialog(`${verb} tenant ${t.tenant_id}`, status === 'SUSPENDED'
    ? 'Its keys become read-only: new reservations are refused; reservations in flight can still commit or release.'
    : 'Its keys can reserve again.', `${verb} tenant`, { danger: status === 'SUSPENDED' });
  if (!ok) return false;
  await patch(`/v1/admin/tenants/${encodeURIComponent(t.tenant_id)}`, { status });
  toast(`${verb}d ${t.tenant_id}`, 'ok');
  return true;
}

// Emergency freeze: every ACTIVE budget of the tenant is frozen, one audited request each.
export async function emergencyFreeze(tenantId) {
  const { rows } = await getAll('/v1/admin/budgets', { tenant_id: tenantId, status: 'ACTIVE' }, 'ledgers', { max: 10000 });
  const ok = await formDialog(`Emergency freeze of ${tenantId}`, [
    { name: 'reason', label: 'Reason (audit log)', value: 'emergency freeze', required: true },
  ], `Freeze ${rows.length} budgets`, async (v) => {
    let done = 0;
    const failed = [];
    for (const b of rows) {
      try { await post('/v1/admin/budgets/freeze', { reason: v.reason }, { scope: b.scope, unit: b.unit }); done++; } catch (e) { failed.push(`${b.scope}: ${e.message}`); }
    }
    return { done, failed };
  }, { intro: h('p', {}, `All ${rows.length} ACTIVE budget(s) of ${tenantId} will refuse new reservations at once. Unfreeze them one by one or in the Budgets page.`) });
  if (ok) toast(`Froze ${ok.done} budget(s) of ${tenantId}${ok.failed.length ? `; ${ok.failed.length} failed` : ''}`, ok.failed.length ? 'error' : 'ok');
  return ok;
}

function createTenantDialog() {
  return formDialog('Create tenant', [
    { name: 'tenant_id', label: 'Tenant id (a-z, 0-9, -)', required: true },
    { name: 'name', label: 'Name', required: true },
  ], 'Create tenant', async (v) => {
    const t = await post('/v1/admin/tenants', { tenant_id: v.tenant_id.trim(), name: v.name.trim() || v.tenant_id.trim() });
    toast(`Created tenant ${t.tenant_id}`, 'ok');
    return t;
  });
}

async function bulkStatus(sel, action, refresh) {
  const ok = await confirmDialog(`${action === 'SUSPEND' ? 'Suspend' : 'Reactivate'} ${sel.length} tenant(s)`,
    `${sel.map((t) => t.tenant_id).join(', ')}`, `${action === 'SUSPEND' ? 'Suspend' : 'Reactivate'} ${sel.length}`, { danger: action === 'SUSPEND' });
  if (!ok) return;
  let n = 0;
  for (const t of sel) {
    try { await patch(`/v1/admin/tenants/${encodeURIComponent(t.tenant_id)}`, { status: action === 'SUSPEND' ? 'SUSPENDED' : 'ACTIVE' }); n++; } catch (e) { toast(`${t.tenant_id}: ${e.message}`, 'error'); }
  }
  toast(`${action === 'SUSPEND' ? 'Suspended' : 'Reactivated'} ${n} tenant(s)`, 'ok');
  refresh();
}

export function render(main, r) {
  let page;
  const actions = session.can('manage_tenants') ? [h('button', { type: 'button', class: 'primary', id: 'create-tenant', onclick: () => createTenantDialog().then((x) => x && page.refresh()) }, 'Create tenant')] : [];
  page = listPage(main, r, { title: 'Tenants', name: 'tenants', actions, selectable: session.can('manage_tenants'),
    filters: [
      { name: 'status', label: 'Status', type: 'select', options: [['', 'any'], 'ACTIVE', 'SUSPENDED', 'CLOSED'] },
      { name: 'search', label: 'Search', type: 'text', placeholder: 'id or name' },
      { name: 'show_closed', label: 'Show closed', type: 'checkbox' }],
    columns: [
      { label: 'Tenant', value: (t) => t.tenant_id, render: (t) => h('a', { href: `#/tenant/${encodeURIComponent(t.tenant_id)}` }, t.tenant_id) },
      { label: 'Name', value: (t) => t.name },
      { label: 'Status', value: (t) => t.status, render: (t) => badge(t.status), width: '120px' },
      { label: 'Created', value: (t) => t.created_at, render: (t) => fmt.time(t.created_at) },
      { label: 'Actions', value: () => '', export: () => '', width: 'minmax(220px, 1.3fr)', render: (t) => h('span', { class: 'row-actions' },
        session.can('manage_tenants') && t.status === 'ACTIVE' ? h('button', { type: 'button', class: 'small warn', 'aria-label': `Suspend ${t.tenant_id}`, onclick: () => setTenantStatus(t, 'SUSPENDED').then((ok) => ok && page.refresh()) }, 'Suspend') : null,
        session.can('manage_tenants') && t.status === 'SUSPENDED' ? h('button', { type: 'button', class: 'small', 'aria-label': `Reactivate ${t.tenant_id}`, onclick: () => setTenantStatus(t, 'ACTIVE').then((ok) => ok && page.refresh()) }, 'Reactivate') : null,
        session.can('manage_budgets') && t.status !== 'CLOSED' ? h('button', { type: 'button', class: 'small danger', 'aria-label': `Emergency freeze ${t.tenant_id}`, onclick: () => emergencyFreeze(t.tenant_id) }, 'Emergency freeze') : null) },
    ],
    key: (t) => t.tenant_id, onRow: (t) => go('tenant', null, t.tenant_id), liveTypes: ['tenant.'],
    bulk: (sel, refresh) => [
      h('button', { type: 'button', class: 'small warn', id: 'bulk-suspend', onclick: () => bulkStatus(sel, 'SUSPEND', refresh) }, 'Suspend selected'),
      h('button', { type: 'button', class: 'small', id: 'bulk-reactivate', onclick: () => bulkStatus(sel, 'REACTIVATE', refresh) }, 'Reactivate selected')],
    load: async (v, onPage) => {
      const { rows, more } = await getAll('/v1/admin/tenants', { status: v.status || undefined, search: v.search || undefined }, 'tenants', { onPage });
      return markTruncated(v.status || v.show_closed ? rows : rows.filter((t) => t.status !== 'CLOSED'), more);
    } });
  return page.cleanup;
}

export async function renderDetail(main, r) {
  const id = r.id;
  const tab = r.params.get('tab') || 'budgets';
  let t;
  try { t = await get(`/v1/admin/tenants/${encodeURIComponent(id)}`); } catch (e) { clear(main, errorBox(e)); return; }
  const tabs = [['budgets', 'Budgets'], ['keys', 'API keys'], ['policies', 'Policies'], ['spend', 'Spend']];
  const panel = h('section', { class: 'tab-panel', role: 'tabpanel' });
  const reload = () => renderDetail(main, r);
  clear(main,
    h('p', {}, h('a', { href: '#/tenants' }, '← Tenants')),
    h('div', { class: 'page-head' }, h('h1', {}, `Tenant ${t.tenant_id} `, badge(t.status)), h('div', { class: 'page-actions' },
      session.can('manage_tenants') && t.status === 'ACTIVE' ? h('button', { type: 'button', class: 'warn', onclick: () => setTenantStatus(t, 'SUSPENDED').then((ok) => ok && reload()) }, 'Suspend tenant') : null,
      session.can('manage_tenants') && t.status === 'SUSPENDED' ? h('button', { type: 'button', onclick: () => setTenantStatus(t, 'ACTIVE').then((ok) => ok && reload()) }, 'Reactivate tenant') : null,
      t.status !== 'CLOSED' ? h('button', { type: 'button', class: 'danger', id: 'emergency-freeze', onclick: () => emergencyFreeze(t.tenant_id).then((ok) => ok && reload()) }, 'Emergency freeze') : null)),
    h('dl', { class: 'facts' }, h('dt', {}, 'Name'), h('dd', {}, t.name), h('dt', {}, 'Created'), h('dd', {}, fmt.time(t.created_at)),
      h('dt', {}, 'Overage default'), h('dd', {}, t.default_commit_overage_policy || '—'),
      h('dt', {}, 'TTL default / max'), h('dd', {}, `${t.default_reservation_ttl_ms ?? '—'} / ${t.max_reservation_ttl_ms ?? '—'} ms`)),
    h('div', { class: 'tabs', role: 'tablist' }, tabs.map(([k, l]) => h('a', { role: 'tab', href: `#/tenant/${encodeURIComponent(id)}?tab=${k}`, 'aria-selected': String(k === tab) }, l))),
    panel);
  try {
    if (tab === 'budgets') {
      const tb = table(budgetColumns(reload), { name: `budgets-${id}` });
      const { rows } = await getAll('/v1/admin/budgets', { tenant_id: id }, 'ledgers');
      panel.append(h('div', { class: 'page-actions' }, h('button', { type: 'button', onclick: () => createBudgetDialog(id).then((x) => x && reload()) }, 'Create budget')), tb.el);
      tb.set(rows, (b) => `${b.scope}|${b.unit}`);
    } else if (tab === 'keys') {
      const tb = table(keyColumns(reload), { name: `keys-${id}` });
      const { rows } = await getAll('/v1/admin/api-keys', { tenant_id: id }, 'keys');
      panel.append(h('div', { class: 'page-actions' }, h('button', { type: 'button', onclick: () => createKeyDialog(id).then((x) => x && reload()) }, 'Create API key')), tb.el);
      tb.set(rows, (k) => k.key_id);
    } else if (tab === 'policies') {
      const { rows } = await getAll('/v1/admin/policies', { tenant_id: id }, 'policies');
      panel.append(h('div', { class: 'page-actions' }, h('button', { type: 'button', onclick: () => policyDialog(id).then((x) => x && reload()) }, 'Create policy')),
        simpleTable(['Name', 'Pattern', 'Priority', 'Status', 'Caps / limits', 'Action rules', ''], rows.map((p) => [p.name || p.policy_id, h('code', {}, p.scope_pattern), String(p.priority ?? 0), badge(p.status),
          JSON.stringify({ caps: p.caps, rate_limits: p.rate_limits, overage: p.commit_overage_policy }, (k, v) => (v === undefined ? undefined : v)),
          h('span', { class: 'rules' }, rulesSummary(p)),
          h('button', { type: 'button', class: 'small', 'aria-label': `Edit policy ${p.name || p.policy_id}`, onclick: () => policyDialog(id, p).then((x) => x && reload()) }, 'Edit')])));
    } else {
      await spendPanel(panel, { tenant: id });
    }
  } catch (e) { panel.append(errorBox(e)); }
}

export async function policyDialog(tenantId, p) {
  const rules = await actionRulesEditor(p);
  return formDialog(p ? `Edit policy ${p.name || p.policy_id}` : 'Create policy', [
    { name: 'name', label: 'Name', value: p ? p.name : '', required: true },
    // a policy's pattern is fixed once created (PATCH does not take it): shown, not editable
    p ? { type: 'custom', build: () => h('p', {}, 'Scope pattern: ', h('code', {}, p.scope_pattern)) }
      : { name: 'scope_pattern', label: 'Scope pattern (e.g. agent:* or tenant:acme/*)', value: `tenant:${tenantId}/*`, required: true },
    { name: 'priority', label: 'Priority', type: 'number', min: 0, step: 1, value: p ? p.priority ?? 0 : 0 },
    { name: 'status', label: 'Status', type: 'select', options: ['ACTIVE', 'DISABLED'], value: p ? p.status : 'ACTIVE' },
    { name: 'rate', label: 'Reservations per minute (optional)', type: 'number', min: 1, step: 1,
      value: p && p.rate_limits ? p.rate_limits.max_reservations_per_minute ?? '' : '' },
    { name: 'caps', label: 'Caps as JSON (optional, e.g. {"max_tokens": 4096})', type: 'textarea', value: p && p.caps ? JSON.stringify(p.caps) : '' },
    { type: 'custom', build: () => rules.el },
  ], p ? 'Save policy' : 'Create policy', async (v) => {
    const body = { name: v.name, priority: Number(v.priority || 0) };
    if (!p) body.scope_pattern = v.scope_pattern;
    if (v.rate) body.rate_limits = { max_reservations_per_minute: Number(v.rate) };
    if (v.caps.trim()) { try { body.caps = JSON.parse(v.caps); } catch (e) { throw new Error('Caps must be JSON.'); } }
    rules.apply(body);
    if (p) { body.status = v.status; return patch(`/v1/admin/policies/${encodeURIComponent(p.policy_id)}`, body); }
    if (session.isAdmin) body.tenant_id = tenantId;
    return post('/v1/admin/policies', body);
  }, { wide: true });
}

export function commands() {
  return [{ label: 'Tenants: suspended', run: () => go('tenants', { status: 'SUSPENDED' }) }, { label: 'Create tenant', run: () => createTenantDialog() }];
}
