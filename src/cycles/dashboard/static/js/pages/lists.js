import { api, get, getAll, post, del, session, uuid } from '../api.js';
import { h, clear, fmt, badge, formDialog, confirmDialog, dialog, toast } from '../ui.js';
import { listPage, markTruncated, amountOf, scopeCell } from './common.js';
import { go } from '../main.js';

const TENANT_PERMISSIONS = ['reservations:create', 'reservations:commit', 'reservations:release', 'reservations:extend',
  'reservations:list', 'balances:read', 'budgets:read', 'budgets:write', 'policies:read', 'policies:write',
  'webhooks:read', 'webhooks:write', 'events:read'];
const DEFAULT_PERMISSIONS = TENANT_PERMISSIONS.slice(0, 7);

// ---- reservations ----
export async function forceRelease(res) {
  const ok = await formDialog(`Force-release ${res.reservation_id}`, [
    { name: 'reason', label: 'Reason (audit log)', value: 'force-released from the dashboard' },
  ], 'Release reservation', async (v) => post(`/v1/reservations/${encodeURIComponent(res.reservation_id)}/release`,
    { idempotency_key: uuid(), reason: v.reason || undefined }),
  { intro: h('p', {}, `Returns the hold of ${fmt.int(amountOf(res.reserved))} ${fmt.unit(res.reserved.unit)} on ${res.scope_path}. The agent's later commit will be refused.`) });
  if (ok) toast(`Released ${res.reservation_id}`, 'ok');
  return ok;
}

export function reservations(main, r) {
  let page;
  const filters = [];
  if (session.isAdmin) filters.push({ name: 'tenant', label: 'Tenant (required)', type: 'text' });
  filters.push({ name: 'status', label: 'Status', type: 'select', options: [['', 'any'], 'ACTIVE', 'COMMITTED', 'RELEASED', 'EXPIRED'] },
    { name: 'workspace', label: 'Workspace', type: 'text' }, { name: 'workflow', label: 'Workflow', type: 'text' },
    { name: 'agent', label: 'Agent', type: 'text' });
  const canRelease = session.isAdmin || (session.who.permissions || []).includes('reservations:release');
  page = listPage(main, r, { title: 'Reservations', name: 'reservations', filters, liveTypes: ['reservation.'],
    columns: [
      { label: 'Reservation', value: (x) => x.reservation_id, class: 'mono', width: 'minmax(160px, 1.2fr)' },
      { label: 'Status', value: (x) => x.status, render: (x) => badge(x.status), width: '120px' },
      { label: 'Scope', value: (x) => x.scope_path, render: (x) => scopeCell(x.scope_path), width: 'minmax(200px, 2fr)' },
      { label: 'Action', value: (x) => `${x.action.kind}/${x.action.name}` },
      { label: 'Reserved', value: (x) => amountOf(x.reserved), render: (x) => fmt.int(amountOf(x.reserved)), class: 'num' },
      { label: 'Committed', value: (x) => amountOf(x.committed), render: (x) => (x.committed ? fmt.int(amountOf(x.committed)) : '—'), class: 'num' },
      { label: 'Created', value: (x) => x.created_at_ms, render: (x) => fmt.time(x.created_at_ms) },
      { label: 'Expires', value: (x) => x.expires_at_ms, render: (x) => (x.status === 'ACTIVE' ? fmt.ago(x.expires_at_ms) : '—') },
      { label: 'Actions', value: () => '', export: () => '', width: '200px', render: (x) => h('span', { class: 'row-actions' },
        x.status === 'ACTIVE' && canRelease
          ? h('button', { type: 'button', class: 'small warn', 'aria-label': `Force-release ${x.reservation_id}`, onclick: () => forceRelease(x).then((ok) => ok && page.refresh()) }, 'Force release') : null,
        h('a', { class: 'small-link', href: `#/evidence?reservation=${encodeURIComponent(x.reservation_id)}`, 'aria-label': `Evidence of ${x.reservation_id}` }, 'Evidence')) },
    ],
    key: (x) => x.reservation_id,
    load: async (v, onPage) => {
      if (session.isAdmin && !v.tenant) return markTruncated([], false);
      const q = { tenant: session.isAdmin ? v.tenant : undefined, status: v.status || undefined, workspace: v.workspace || undefined,
        workflow: v.workflow || undefined, agent: v.agent || undefined };
      const { rows, more } = await getAll('/v1/reservations', q, 'reservations', { max: 10000, pageSize: 200, onPage });
      return markTruncated(rows, more);
    } });
  return page.cleanup;
}

// ---- events ----
const CATEGORIES = ['', 'budget', 'reservation', 'tenant', 'api_key', 'policy', 'webhook', 'system'];

function eventDialog(ev) {
  return dialog(`${ev.event_type}`, (close) => h('div', {},
    h('pre', { class: 'json' }, JSON.stringify(ev, null, 2)),
    h('div', { class: 'actions' },
      ev.correlation_id ? h('button', { type: 'button', onclick: () => { close(); go('events', { correlation_id: ev.correlation_id }); } }, 'Same correlation') : null,
      session.can('view_audit') && ev.request_id ? h('button', { type: 'button', onclick: () => { close(); go('audit', { request_id: ev.request_id }); } }, 'Audit row') : null,
      h('button', { type: 'button', class: 'primary', onclick: () => close() }, 'Close'))), { wide: true });
}

export function events(main, r) {
  const filters = [];
  if (session.isAdmin) filters.push({ name: 'tenant_id', label: 'Tenant', type: 'text', placeholder: 'all' });
  filters.push({ name: 'category', label: 'Category', type: 'select', options: CATEGORIES.map((c) => [c, c || 'any']) },
    { name: 'event_type', label: 'Event type', type: 'text', placeholder: 'e.g. budget.exhausted' },
    { name: 'scope', label: 'Scope prefix', type: 'text' },
    { name: 'correlation_id', label: 'Correlation', type: 'text' });
  const matches = (ev, v) => (!v.tenant_id || ev.tenant_id === v.tenant_id) && (!v.category || ev.category === v.category)
    && (!v.event_type || ev.event_type === v.event_type) && (!v.scope || (ev.scope || '').startsWith(v.scope))
    && (!v.correlation_id || ev.correlation_id === v.correlation_id);
  const page = listPage(main, r, { title: 'Events', name: 'events', filters, liveRow: matches,
    intro: h('p', { class: 'muted' }, 'New events appear as they happen (live).'),
    columns: [
      { label: 'Time', value: (e) => e.timestamp, render: (e) => fmt.time(e.timestamp), width: '180px' },
      { label: 'Type', value: (e) => e.event_type, render: (e) => h('span', { class: `etype ${e.category}` }, e.event_type), width: 'minmax(180px, 1.3fr)' },
      { label: 'Tenant', value: (e) => e.tenant_id },
      { label: 'Scope', value: (e) => e.scope || '', render: (e) => scopeCell(e.scope || '—'), width: 'minmax(180px, 2fr)' },
      { label: 'Actor', value: (e) => (e.actor ? e.actor.type : '') },
      { label: 'Correlation', value: (e) => e.correlation_id || '', class: 'mono' },
    ],
    key: (e) => e.event_id, onRow: eventDialog,
    load: async (v, onPage) => {
      const path = session.isAdmin ? '/v1/admin/events' : '/v1/events';
      const q = { tenant_id: session.isAdmin ? v.tenant_id : undefined, category: v.category || undefined,
        event_type: v.event_type || undefined, scope: v.scope || undefined, correlation_id: v.correlation_id || undefined };
      const { rows, more } = await getAll(path, q, 'events', { max: 2000, onPage });
      return markTruncated(rows, more);
    } });
  return page.cleanup;
}

// ---- API keys ----
export function keyColumns(refresh) {
  return [
    { label: 'Key', value: (k) => k.key_id, class: 'mono' },
    { label: 'Prefix', value: (k) => k.key_prefix, class: 'mono', width: '150px' },
    { label: 'Tenant', value: (k) => k.tenant_id },
    { label: 'Name', value: (k) => k.name || '' },
    { label: 'Status', value: (k) => k.status, render: (k) => badge(k.status), width: '110px' },
    { label: 'Expires', value: (k) => k.expires_at, render: (k) => h('span', { class: expiringSoon(k) ? 'warn-text' : '' }, fmt.time(k.expires_at)) },
    { label: 'Last used', value: (k) => k.last_used_at || '', render: (k) => (k.last_used_at ? fmt.ago(k.last_used_at) : 'never') },
    { label: 'Permissions', value: (k) => (k.permissions || []).join(' '), render: (k) => h('span', { class: 'perms', title: (k.permissions || []).join(', ') }, `${(k.permissions || []).length} granted`) },
    { label: 'Actions', value: () => '', export: () => '', width: '130px', render: (k) => (k.status === 'ACTIVE' && session.can('manage_api_keys')
      ? h('span', { class: 'row-actions' },
        h('button', { type: 'button', class: 'small', 'aria-label': `Edit ${k.key_id}`, onclick: () => editKeyDialog(k).then((ok) => ok && refresh()) }, 'Edit'),
        h('button', { type: 'button', class: 'small danger', 'aria-label': `Revoke ${k.key_id}`, onclick: () => revokeKey(k).then((ok) => ok && refresh()) }, 'Revoke')) : '') },
  ];
}

export function expiringSoon(k) { return k.status === 'ACTIVE' && Date.parse(k.expires_at) - Date.now() < 7 * 86400000; }

async function revokeKey(k) {
  const ok = await formDialog(`Revoke key ${k.key_prefix}…`, [{ name: 'reason', label: 'Reason (audit log)', value: 'revoked from the dashboard' }],
    'Revoke key', async (v) => del(`/v1/admin/api-keys/${encodeURIComponent(k.key_id)}`, { reason: v.reason || undefined }),
    { intro: h('p', {}, 'Revocation is permanent and applies to the very next request. The key stays listed as REVOKED.') });
  if (ok) toast(`Revoked ${k.key_id}`, 'ok');
  return ok;
}

function permissionGrid(perms, granted) {
  return h('fieldset', { class: 'perm-grid' }, h('legend', {}, 'Permissions'),
    TENANT_PERMISSIONS.map((p) => { const id = `perm-${p.replace(':', '-')}`; perms[p] = h('input', { type: 'checkbox', id, checked: granted.includes(p) });
      return h('label', { for: id, class: 'check' }, perms[p], ` ${p}`); }));
}

// Permissions and scope_filter changes apply to the key's very next request.
export function editKeyDialog(k) {
  const perms = {};
  return formDialog(`Edit key ${k.key_prefix}…`, [
    { name: 'name', label: 'Name', value: k.name || '' },
    { name: 'scope_filter', label: 'Scope filter (comma-separated; empty: no restriction)', value: (k.scope_filter || []).join(',') },
    { type: 'custom', build: () => permissionGrid(perms, k.permissions || []) },
  ], 'Save key', async (v) => {
    const body = { name: v.name.trim() || undefined, permissions: Object.keys(perms).filter((p) => perms[p].checked),
      scope_filter: v.scope_filter.split(',').map((s) => s.trim()).filter(Boolean) };
    const saved = await api('PATCH', `/v1/admin/api-keys/${encodeURIComponent(k.key_id)}`, { body });
    toast(`Saved ${k.key_id}`, 'ok');
    return saved;
  }, { wide: true });
}

export function createKeyDialog(tenantId) {
  const perms = {};
  return formDialog('Create API key', [
    { name: 'tenant_id', label: 'Tenant', value: tenantId || '', required: true },
    { name: 'name', label: 'Name', required: true, value: '' },
    { name: 'scope_filter', label: 'Scope filter (optional, comma-separated, e.g. workspace:eng,agent:*)' },
    { name: 'expires_days', label: 'Expires in (days)', type: 'number', min: 1, step: 1, value: 90 },
    { type: 'custom', build: () => permissionGrid(perms, DEFAULT_PERMISSIONS) },
  ], 'Create key', async (v) => {
    const body = { tenant_id: v.tenant_id.trim(), name: v.name.trim(), permissions: Object.keys(perms).filter((p) => perms[p].checked) };
    if (v.scope_filter.trim()) body.scope_filter = v.scope_filter.split(',').map((s) => s.trim()).filter(Boolean);
    if (v.expires_days) body.expires_at = new Date(Date.now() + Number(v.expires_days) * 86400000).toISOString();
    const created = await post('/v1/admin/api-keys', body);
    await showSecret('API key created', created.key_secret, 'Copy it now: the server keeps only a hash and will never show it again.');
    return created;
  }, { wide: true });
}

export function showSecret(title, secret, note) {
  return dialog(title, (close) => {
    const field = h('input', { type: 'text', readonly: true, value: secret, id: 'new-secret', class: 'mono', 'aria-label': 'Secret (shown once)' });
    return h('div', {}, h('p', {}, note), field, h('div', { class: 'actions' },
      h('button', { type: 'button', onclick: async () => { try { await navigator.clipboard.writeText(secret); toast('Copied', 'ok'); } catch (e) { field.select(); } } }, 'Copy'),
      h('button', { type: 'button', class: 'primary', onclick: () => { field.value = ''; close(true); } }, 'I have stored it')));
  });
}

export function keys(main, r) {
  let page;
  const actions = session.can('manage_api_keys') ? [h('button', { type: 'button', class: 'primary', id: 'create-key',
    onclick: () => createKeyDialog(page.values.tenant_id).then((x) => x && page.refresh()) }, 'Create API key')] : [];
  page = listPage(main, r, { title: 'API keys', name: 'api-keys', actions, liveTypes: ['api_key.'],
    filters: [{ name: 'tenant_id', label: 'Tenant', type: 'text', placeholder: 'all' },
      { name: 'status', label: 'Status', type: 'select', options: [['', 'any'], 'ACTIVE', 'REVOKED', 'EXPIRED'] },
      { name: 'search', label: 'Search', type: 'text', placeholder: 'key id or name' },
      { name: 'hide_revoked', label: 'Hide revoked', type: 'checkbox' }],
    columns: keyColumns(() => page.refresh()), key: (k) => k.key_id,
    load: async (v, onPage) => {
      const { rows, more } = await getAll('/v1/admin/api-keys', { tenant_id: v.tenant_id || undefined, status: v.status || undefined, search: v.search || undefined }, 'keys', { onPage });
      return markTruncated(v.hide_revoked ? rows.filter((k) => k.status !== 'REVOKED') : rows, more);
    } });
  return page.cleanup;
}

export function keyCommands() { return [{ label: 'Create API key', run: () => createKeyDialog() }]; }

// ---- audit ----
export function audit(main, r) {
  const page = listPage(main, r, { title: 'Audit', name: 'audit', liveTypes: [],
    filters: [{ name: 'tenant_id', label: 'Tenant', type: 'text', placeholder: '__admin__ for operator rows' },
      { name: 'operation', label: 'Operation', type: 'text', placeholder: 'e.g. freezeBudget' },
      { name: 'resource_type', label: 'Resource', type: 'select', options: [['', 'any'], 'tenant', 'budget', 'api_key', 'policy', 'webhook', 'reservation', 'admin_key'] },
      { name: 'status_min', label: 'Status ≥', type: 'select', options: [['', 'any'], ['400', '400 (failures)'], ['500', '500']] },
      { name: 'request_id', label: 'Request id', type: 'text' },
      { name: 'search', label: 'Search', type: 'text' }],
    columns: [
      { label: 'Time', value: (a) => a.timestamp, render: (a) => fmt.time(a.timestamp), width: '180px' },
      { label: 'Operation', value: (a) => a.operation },
      { label: 'Status', value: (a) => a.status, render: (a) => badge(String(a.status), a.status >= 400 ? 'crit' : 'ok'), width: '80px' },
      { label: 'Tenant', value: (a) => a.tenant_id },
      { label: 'Resource', value: (a) => `${a.resource_type || ''} ${a.resource_id || ''}`.trim(), width: 'minmax(180px, 1.6fr)' },
      { label: 'Key', value: (a) => a.key_id || '', class: 'mono' },
      { label: 'Error', value: (a) => a.error_code || '' },
      { label: 'Request', value: (a) => a.request_id || '', class: 'mono' },
    ],
    key: (a) => a.log_id,
    onRow: (a) => dialog(`Audit ${a.operation}`, (close) => h('div', {}, h('pre', { class: 'json' }, JSON.stringify(a, null, 2)),
      h('div', { class: 'actions' }, h('button', { type: 'button', class: 'primary', onclick: () => close() }, 'Close'))), { wide: true }),
    load: async (v, onPage) => {
      const q = { tenant_id: v.tenant_id || undefined, operation: v.operation || undefined, resource_type: v.resource_type || undefined,
        status_min: v.status_min || undefined, request_id: v.request_id || undefined, search: v.search || undefined };
      const { rows, more } = await getAll('/v1/admin/audit/logs', q, 'logs', { max: 2000, pageSize: 200, onPage });
      return markTruncated(rows, more);
    } });
  return page.cleanup;
}
