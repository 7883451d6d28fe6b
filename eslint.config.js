// @ts-check
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'data/**', 'coverage/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.ts'],
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
      '@typescript-eslint/consistent-type-imports': 'error',
      'no-console': 'error',
    },
  },
  {
    // The plain-JavaScript launcher (and the bench's preload) run on Node: their globals are Node's.
    files: ['bin/**/*.js', 'bench/**/*.mjs'],
    languageOptions: { globals: { URL: 'readonly', console: 'readonly', process: 'readonly' } },
  },
  {
    // The operator page's hand-written modules run in the browser; no build step.
    files: ['web/**/*.js'],
    languageOptions: {
      sourceType: 'module',
      globals: Object.fromEntries(
        ['document', 'window', 'navigator', 'location', 'fetch', 'sessionStorage', 'URLSearchParams', 'setTimeout', 'clearTimeout', 'setInterval', 'getSelection', 'Node', 'CSS'].map((g) => [g, 'readonly']),
      ),
    },
  },
  {
    files: ['src/cli.ts', 'scripts/**', 'bench/**', 'test/**'],
    rules: { 'no-console': 'off' },
  },
);
