#!/usr/bin/env node
'use strict';
// prepack guard: the package ships protos/loupe/v1/*.proto, copies of the repository's top-level
// protos/ (the single source) written by `make protos` (scripts/gen_protos.sh). Packing fails when
// a copy is missing or differs from its source, so a tarball never carries a stale API.
// Outside a checkout (no ../../protos) only the presence of the copies is checked.
const fs = require('node:fs');
const path = require('node:path');

const SHIPPED = ['retrieval.proto', 'types.proto'];
const pkgDir = path.resolve(__dirname, '..');
const copies = path.join(pkgDir, 'protos', 'loupe', 'v1');
const source = path.resolve(pkgDir, '..', '..', 'protos', 'loupe', 'v1');

const problems = [];
for (const name of SHIPPED) {
  const copy = path.join(copies, name);
  if (!fs.existsSync(copy)) {
    problems.push(`${path.relative(pkgDir, copy)} is missing`);
  } else if (fs.existsSync(source) && !fs.readFileSync(copy).equals(fs.readFileSync(path.join(source, name)))) {
    problems.push(`${path.relative(pkgDir, copy)} (in the package) differs from the repository's protos/loupe/v1/${name}`);
  }
}
if (problems.length) {
  console.error(`@loupe/client: stale protos (run \`make protos\` at the repository root):\n  ${problems.join('\n  ')}`);
  process.exit(1);
}
