// Requests made from this browser, kept in localStorage. Views that show them subscribe with
// onHistoryChange, so this module depends on no view (the run and the History tab both use it).
const listeners = [];

export function onHistoryChange(listener) {
  listeners.push(listener);
}

const HISTORY_STORAGE = "tooncrafter.playground.history";
const HISTORY_MAX = 30;

export function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_STORAGE)) || []; } catch { return []; }
}

export function saveHistory(entries) {
  localStorage.setItem(HISTORY_STORAGE, JSON.stringify(entries.slice(0, HISTORY_MAX)));
  for (const listener of listeners) listener();
}

export function updateHistory(requestId, patch) {
  const entries = loadHistory();
  const entry = entries.find((e) => e.request_id === requestId);
  if (!entry) return;
  if (Object.entries(patch).every(([k, v]) => entry[k] === v)) return;
  Object.assign(entry, patch);
  saveHistory(entries);
}
