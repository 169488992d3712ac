// Usage: node multipart.mjs SERVER_URL SIZE
// Makes SIZE bytes of a fixed pseudo-random pattern here (nothing big in the repo or on disk), uploads
// them with the real `fal.storage.upload` (over its 90 MiB threshold it initiates a multipart upload,
// PUTs 10 MiB parts and completes), its REST host rewritten to SERVER_URL by a request middleware,
// and prints {"file_url", "sha256", "size"} as JSON on the last line.
import { createHash } from "node:crypto";
import { createFalClient } from "@fal-ai/client";

const [serverUrl, sizeArg] = process.argv.slice(2);
const size = Number(sizeArg);
if (!serverUrl || !Number.isSafeInteger(size) || size <= 0) {
  console.error("usage: node multipart.mjs SERVER_URL SIZE");
  process.exit(2);
}

const bytes = new Uint8Array(size);
let state = 0x9e3779b9; // xorshift32: every part differs from the others
for (let i = 0; i < size; i++) {
  state ^= state << 13;
  state ^= state >>> 17;
  state ^= state << 5;
  bytes[i] = state & 0xff;
}
const sha256 = createHash("sha256").update(bytes).digest("hex");

const fal = createFalClient({
  credentials: "test-key",
  requestMiddleware: async (request) => ({
    ...request,
    url: request.url.replace(/^https:\/\/rest\.fal\.ai/, serverUrl.replace(/\/$/, "")),
  }),
});
const fileUrl = await fal.storage.upload(new File([bytes], "big.bin", { type: "application/octet-stream" }));
console.log(JSON.stringify({ file_url: fileUrl, sha256, size }));
