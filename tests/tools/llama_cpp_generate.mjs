// Greedy generation with llama.cpp (node-llama-cpp's prebuilt CPU build), for
// tests/export_gguf.rs: loads the GGUF file argv[2], and for each prompt of the JSON list
// argv[3] prints (one JSON line) the ids llama.cpp encodes it to (special tokens written in the
// text parsed as such, as transformers does) — BOS first when the file says
// to add one — and the argv[4] ids it generates greedily (end-of-generation tokens included, and
// generation going on past them, so that every step is compared). argv[5]: the directory
// tests/setup.sh installed node-llama-cpp into (its node_modules/).
import { pathToFileURL } from "node:url";
import { join } from "node:path";

const [modelPath, promptsJson, maxTokens, toolsDir] = process.argv.slice(2);
const { getLlama } = await import(
  pathToFileURL(join(toolsDir, "node_modules", "node-llama-cpp", "dist", "index.js")).href
);
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ contextSize: 256, sequences: 1 });
const sequence = context.getSequence();
for (const prompt of JSON.parse(promptsJson)) {
  await sequence.clearHistory();
  const prefix = model.tokens.shouldPrependBosToken ? [model.tokens.bos] : [];
  const tokens = [...prefix, ...model.tokenize(prompt, true)];
  const generated = [];
  for await (const t of sequence.evaluate(tokens, { temperature: 0, yieldEogToken: true })) {
    generated.push(t);
    if (generated.length >= Number(maxTokens)) break;
  }
  console.log(JSON.stringify({ prompt: tokens, generated }));
}
await context.dispose();
await model.dispose();
