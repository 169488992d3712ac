// The public API as the page uses it: JSON calls with the stored key, and uploads through the storage flow
// (POST storage/upload/initiate + PUT upload_url, what fal.storage.upload does).

export const BASE = new URL(".", location.href).href.replace(/\/$/, ""); // works under a path prefix too
export const KEY_STORAGE = "tooncrafter.playground.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.message || (typeof body.detail === "string" && body.detail))) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Key ${key}` } : extra;
}

export async function api(method, url, body) {
  const headers = authHeaders({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

export async function uploadFile(file) {
  const contentType = file.type || "application/octet-stream";
  const { upload_url, file_url } = await api("POST", `${BASE}/storage/upload/initiate`, {
    content_type: contentType,
    file_name: file.name,
  });
  // the one-time token in upload_url is the permission: no Authorization header on the PUT
  const res = await fetch(upload_url, { method: "PUT", body: file, headers: { "Content-Type": contentType } });
  if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
  return file_url;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
