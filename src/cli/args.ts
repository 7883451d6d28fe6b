/**
 * The CLI's commands, their usage and their flags, in one table: `--help` on any of them
 * prints its usage and acts on nothing; a flag a command does not take is refused, named.
 */
export interface CommandSpec {
  usage: string;
  summary: string;
  /** Flags and whether each takes a value. */
  flags: Record<string, 'boolean' | 'value'>;
  /** How many positional arguments: [min, max]. */
  positionals: [number, number];
  /** Subcommands (clients add|list|revoke): the first positional picks one. */
  subcommands?: Record<string, CommandSpec>;
}

const CONFIG_NOTE = 'Configuration is read from environment variables (README.md, "Configuration").';

export const COMMANDS: Record<string, CommandSpec> = {
  serve: {
    usage: 'npx codex-auth-broker serve',
    summary: 'run the broker: the HTTP API and the refresher (stops cleanly on SIGTERM/SIGINT)',
    flags: {},
    positionals: [0, 0],
  },
  login: {
    usage: 'npx codex-auth-broker login [--credential <name>] [--pool <pool>] [--browser] [--force]',
    summary:
      'log in from here (a device code typed at the issuer, or with --browser a sign-in whose\ncallback URL you paste) and store the result as the shared login; --force stores it even\nwhen the stale-seed guard refuses it (exit code 4). --credential stores it as a named login\nbeside default (created only once the login is stored), --pool puts that credential in a\npool (default: default)',
    flags: { '--credential': 'value', '--pool': 'value', '--browser': 'boolean', '--force': 'boolean' },
    positionals: [0, 0],
  },
  seed: {
    usage: 'npx codex-auth-broker seed [--force] [--credential <name>] [--pool <pool>] <auth.json|->',
    summary:
      'validate a codex auth.json (a file, or - for standard input) and store it as the shared\nlogin; a stale copy (its refresh token already spent by the broker, or older than the\nstored login of the same account) is refused with exit code 4 unless --force.\n--credential stores it as a named login beside default (created if new), --pool puts that\ncredential in a pool (default: default)',
    flags: { '--force': 'boolean', '--credential': 'value', '--pool': 'value' },
    positionals: [1, 1],
  },
  status: {
    usage: 'npx codex-auth-broker status [--json]',
    summary: "print the stored credential's state, account, plan and expiry (never a token);\nexit 0 when fresh or due, 3 otherwise",
    flags: { '--json': 'boolean' },
    positionals: [0, 0],
  },
  migrate: {
    usage: 'npx codex-auth-broker migrate',
    summary: 'apply the database migrations and exit (serve applies them at start too)',
    flags: {},
    positionals: [0, 0],
  },
  clients: {
    usage: 'npx codex-auth-broker clients <add|list|revoke> …',
    summary: 'workspace clients: create one (its token is shown once), list them, revoke one',
    flags: {},
    positionals: [1, 1],
    subcommands: {
      add: {
        usage: 'npx codex-auth-broker clients add <name> [--workspace <uuid>] [--pool <pool>]',
        summary: "create a workspace client; prints its token and refresh credential once (store them now:\nonly their SHA-256 is kept). --workspace binds it to one workspace id on the drop-in route;\n--pool binds it to a pool of credentials (default: default)",
        flags: { '--workspace': 'value', '--pool': 'value' },
        positionals: [1, 1],
      },
      list: {
        usage: 'npx codex-auth-broker clients list [--json]',
        summary: 'list the clients: name, workspace, state (active, stale, never_seen), last seen; never a token',
        flags: { '--json': 'boolean' },
        positionals: [0, 0],
      },
      revoke: {
        usage: 'npx codex-auth-broker clients revoke <name>',
        summary: 'revoke a client; every replica drops it at once',
        flags: {},
        positionals: [1, 1],
      },
    },
  },
  credentials: {
    usage: 'npx codex-auth-broker credentials <list|remove> …',
    summary: 'the logins the broker holds side by side: list them, remove one',
    flags: {},
    positionals: [1, 1],
    subcommands: {
      list: {
        usage: 'npx codex-auth-broker credentials list [--json]',
        summary: 'list the credentials: name, pool, state, account, plan, expiry, clients assigned; never a token',
        flags: { '--json': 'boolean' },
        positionals: [0, 0],
      },
      remove: {
        usage: 'npx codex-auth-broker credentials remove <name> [--reassign]',
        summary: 'remove a named credential and its stored login; refused while clients are assigned to it\nunless --reassign (they move to the other credentials of its pool)',
        flags: { '--reassign': 'boolean' },
        positionals: [1, 1],
      },
    },
  },
};

export function usage(): string {
  const lines = ['usage: npx codex-auth-broker <command> [--help]', ''];
  for (const spec of Object.values(COMMANDS)) {
    for (const s of spec.subcommands ? Object.values(spec.subcommands) : [spec]) {
      lines.push(`  ${s.usage.replace(/^npx codex-auth-broker /, '')}`);
      for (const l of s.summary.split('\n')) lines.push(`      ${l}`);
    }
  }
  lines.push('', '  --version             print the version', '  --help                this text; `<command> --help` for one command', '', CONFIG_NOTE);
  return lines.join('\n');
}

export function commandHelp(spec: CommandSpec): string {
  const parts = [`usage: ${spec.usage}`, '', spec.summary];
  if (spec.subcommands) for (const s of Object.values(spec.subcommands)) parts.push('', `  ${s.usage}`, ...s.summary.split('\n').map((l) => `      ${l}`));
  parts.push('', CONFIG_NOTE);
  return parts.join('\n');
}

export type Parsed =
  | { kind: 'help'; text: string }
  | { kind: 'error'; message: string }
  | { kind: 'run'; command: string; sub: string | undefined; flags: Record<string, string | true>; positionals: string[]; raw: string[] };

/** Parse argv after the command name against its spec (and its subcommand's). */
export function parseCommand(command: string, args: string[]): Parsed {
  const top = COMMANDS[command];
  if (!top) return { kind: 'error', message: `unknown command: ${command}` };
  let spec = top;
  let sub: string | undefined;
  let rest = args;
  if (top.subcommands) {
    const first = args.find((a) => !a.startsWith('-'));
    if (args.includes('--help') || args.includes('-h')) {
      const picked = first !== undefined ? top.subcommands[first] : undefined;
      return { kind: 'help', text: commandHelp(picked ?? top) };
    }
    if (first === undefined) return { kind: 'error', message: `${command}: name a subcommand (${Object.keys(top.subcommands).join(', ')})\n\n${commandHelp(top)}` };
    const picked = top.subcommands[first];
    if (!picked) return { kind: 'error', message: `${command}: unknown subcommand ${JSON.stringify(first)} (expected ${Object.keys(top.subcommands).join(', ')})` };
    spec = picked;
    sub = first;
    const at = args.indexOf(first);
    rest = args.filter((_a, i) => i !== at);
  }
  const flags: Record<string, string | true> = {};
  const positionals: string[] = [];
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i]!;
    if (a === '--help' || a === '-h') return { kind: 'help', text: commandHelp(spec) };
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq >= 0 ? a.slice(0, eq) : a;
      const kind = spec.flags[name];
      const label = sub ? `${command} ${sub}` : command;
      if (!kind) return { kind: 'error', message: `${label}: unknown flag ${name}\nusage: ${spec.usage}` };
      if (kind === 'boolean') {
        if (eq >= 0) return { kind: 'error', message: `${label}: ${name} takes no value\nusage: ${spec.usage}` };
        flags[name] = true;
      } else {
        const value = eq >= 0 ? a.slice(eq + 1) : rest[++i];
        if (value === undefined || value === '') return { kind: 'error', message: `${label}: ${name} needs a value\nusage: ${spec.usage}` };
        flags[name] = value;
      }
    } else if (a.startsWith('-') && a !== '-') {
      return { kind: 'error', message: `${sub ? `${command} ${sub}` : command}: unknown flag ${a}\nusage: ${spec.usage}` };
    } else {
      positionals.push(a);
    }
  }
  const [min, max] = spec.positionals;
  if (positionals.length < min || positionals.length > max) {
    return { kind: 'error', message: `${sub ? `${command} ${sub}` : command}: expected ${min === max ? min : `${min} to ${max}`} argument${max === 1 ? '' : 's'}, got ${positionals.length}\nusage: ${spec.usage}` };
  }
  return { kind: 'run', command, sub, flags, positionals, raw: args };
}
