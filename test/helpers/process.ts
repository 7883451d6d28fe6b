import { spawn, type ChildProcessByStdio } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';

export interface ProcessResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  durationMs: number;
}

export interface RunOptions {
  env: NodeJS.ProcessEnv;
  cwd?: string;
  /** Written to standard input, which is then closed (default: no input). */
  input?: string;
  timeoutMs?: number;
}

/**
 * Run a program ASYNCHRONOUSLY (a fake server in this process must keep answering it) in
 * its own process group, killed with all its children when the timeout runs out.
 */
export function runProcess(command: string, args: string[], o: RunOptions): Promise<ProcessResult> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    // No input: standard input is /dev/null (EOF at once), so there is no pipe to break.
    const stdin = o.input === undefined ? 'ignore' : 'pipe';
    const child = spawn(command, args, { cwd: o.cwd, env: o.env, stdio: [stdin, 'pipe', 'pipe'], detached: true }) as ChildProcessByStdio<Writable | null, Readable, Readable>;
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-(child.pid ?? 0), 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    }, o.timeoutMs ?? 60_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, timedOut, durationMs: Date.now() - started });
    });
    if (child.stdin) {
      // A program may exit without reading its input (a usage error, say): the write then
      // fails with EPIPE, which is the program's business, not a test failure.
      child.stdin.on('error', (err: NodeJS.ErrnoException) => {
        if (err.code !== 'EPIPE') reject(err);
      });
      child.stdin.end(o.input);
    }
  });
}
