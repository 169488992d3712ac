// Usage: node upload.mjs SERVER_URL FILE [CONTENT_TYPE]
// Uploads FILE with the real `fal.storage.upload`, its REST host (https://rest.fal.ai) rewritten to
// SERVER_URL by a request middleware, and prints {"file_url": ...} as JSON on the last line.
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import { createFalClient } from "@fal-ai/client";

const [serverUrl, filePath, contentType = "image/png"] = process.argv.slice(2);
if (!serverUrl || !filePath) {
  console.error("usage: node upload.mjs SERVER_URL FILE [CONTENT_TYPE]");
  process.exit(2);
}

const fal = createFalClient({
  credentials: "test-key",
  requestMiddleware: async (request) => ({
    ...request,
    url: request.url.replace(/^https:\/\/rest\.fal\.ai/, serverUrl.replace(/\/$/, "")),
  }),
});

const bytes = await readFile(filePath);
const file = new File([bytes], basename(filePath), { type: contentType });
const fileUrl = await fal.storage.upload(file);
console.log(JSON.stringify({ file_url: fileUrl }));
