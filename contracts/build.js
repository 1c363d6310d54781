#!/usr/bin/env node
// Compiles contracts/src/*.sol with solcjs (the npm package `solc`, pinned in
// package.json) into contracts/artifacts/<Contract>.json: ABI and creation bytecode.
// `--check` recompiles and fails if the committed artifacts differ from the sources.
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const root = __dirname;
const srcDir = path.join(root, 'src');
const outDir = path.join(root, 'artifacts');
const check = process.argv.includes('--check');

const sources = {};
for (const file of fs.readdirSync(srcDir).filter((f) => f.endsWith('.sol')).sort()) {
  sources[file] = { content: fs.readFileSync(path.join(srcDir, file), 'utf8') };
}
const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'paris',
    // No metadata hash: the bytecode depends on the sources and settings only.
    metadata: { bytecodeHash: 'none', appendCBOR: false },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);

const wanted = new Set(['RecordToken', 'ConsentRegistry', 'AuditAnchor', 'Paymaster']);
const artifacts = {};
for (const file of Object.keys(output.contracts).sort()) {
  for (const [name, c] of Object.entries(output.contracts[file])) {
    if (!wanted.has(name)) continue;
    artifacts[`${name}.json`] =
      JSON.stringify(
        { contractName: name, compiler: `solc ${solc.version()}`, source: `src/${file}`, abi: c.abi, bytecode: `0x${c.evm.bytecode.object}` },
        null,
        2,
      ) + '\n';
  }
}
if (Object.keys(artifacts).length !== wanted.size) {
  console.error('missing contracts in the compiler output');
  process.exit(1);
}
if (check) {
  const stale = Object.entries(artifacts).filter(([file, text]) => {
    const p = path.join(outDir, file);
    return !fs.existsSync(p) || fs.readFileSync(p, 'utf8') !== text;
  });
  const extra = fs.existsSync(outDir) ? fs.readdirSync(outDir).filter((f) => !(f in artifacts)) : [];
  if (stale.length > 0 || extra.length > 0) {
    console.error(`contracts/artifacts is out of date (${[...stale.map(([f]) => f), ...extra].join(', ')}): run \`node contracts/build.js\` and commit the result`);
    process.exit(1);
  }
  console.log(`contracts/artifacts match the sources (${Object.keys(artifacts).length} contracts, solc ${solc.version()})`);
} else {
  fs.mkdirSync(outDir, { recursive: true });
  for (const [file, text] of Object.entries(artifacts)) fs.writeFileSync(path.join(outDir, file), text);
  console.log(`wrote ${Object.keys(artifacts).length} artifacts to contracts/artifacts (solc ${solc.version()})`);
}
