// Unpack OHIF v3's built viewer (npm @ohif/app, pinned with its integrity in package.json)
// into viewer/ohif/ without installing the package's dependencies.
//
// Why not `npm ci`: @ohif/app's declared dependencies do not resolve on the registry
// (@ohif/i18n@3.13.2 is not published), and the test only needs the prebuilt dist/.
// `npm pack` fetches the tarball through the ordinary client (and its cache); the
// tarball's sha512 must equal the pinned integrity, or nothing is unpacked.
//
// Usage (from the Makefile's viewer-deps target): node fetch-ohif.mjs
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import {
  existsSync, mkdtempSync, readFileSync, renameSync, rmSync, utimesSync, writeFileSync,
} from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pin = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8')).ohif;
const target = join(here, 'ohif');
const stamp = join(target, '.integrity');

if (existsSync(stamp) && readFileSync(stamp, 'utf8').trim() === pin.integrity) {
  const now = new Date();
  utimesSync(stamp, now, now); // newer than package.json: make sees the target up to date
  console.log(`OHIF ${pin.version} already unpacked in ${target}`);
  process.exit(0);
}

const work = mkdtempSync(join(here, '.ohif-'));
try {
  const spec = `${pin.package}@${pin.version}`;
  const out = execFileSync(
    'npm', ['pack', spec, '--json', '--pack-destination', work],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const [info] = JSON.parse(out);
  const tarball = join(work, info.filename);
  const digest = 'sha512-' + createHash('sha512').update(readFileSync(tarball)).digest('base64');
  if (digest !== pin.integrity) {
    throw new Error(`${spec}: integrity ${digest} does not match the pinned ${pin.integrity}`);
  }
  execFileSync('tar', ['-xzf', tarball, '-C', work, 'package/dist'], { stdio: 'inherit' });
  rmSync(target, { recursive: true, force: true });
  renameSync(join(work, 'package', 'dist'), target);
  writeFileSync(stamp, pin.integrity + '\n');
  console.log(`OHIF ${pin.version} unpacked in ${target}`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
